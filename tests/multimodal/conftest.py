import pytest

from .mmutil import FakeEncoder


@pytest.fixture(scope="session")
def fake_home(tmp_path_factory):
    """AIGC_HOME in a temporary folder and the fake text encoder, for the whole session."""
    from aigckit.multimodal import textcond

    mp = pytest.MonkeyPatch()
    mp.setenv("AIGC_HOME", str(tmp_path_factory.mktemp("home")))
    enc = FakeEncoder()
    mp.setattr(textcond, "load_text_encoder", lambda *a, **k: enc)
    yield enc
    mp.undo()


@pytest.fixture(scope="session")
def t2i_run(fake_home, tmp_path_factory):
    """A tiny text-to-image run on captioned Fashion-MNIST: three training steps."""
    from aigckit.train.loop import TrainArgs, train

    run = tmp_path_factory.mktemp("t2i") / "run"
    train(TrainArgs(model="ddpm", out=str(run), data="fashion-mnist-captions", condition="text", steps=3,
                    batch_size=8, size="tiny", timesteps=20, grid_steps=2, log_every=1, sample_every=1000),
          progress=False)
    return run
