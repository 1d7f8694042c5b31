from .glyphs import Glyphs, GlyphsCacheError
