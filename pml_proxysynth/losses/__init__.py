from .proxy_specs import PROXY_SPECS, ProxySpec
from .proxy_synthesis_loss import ProxySynthesisLoss, Synthesis
