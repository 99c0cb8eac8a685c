"""Cross-modal generation: captioned data (captions, shapes), the frozen text encoder (textcond), CLIP-style model."""
