"""Speech synthesis (VITS, Piper voices)."""
