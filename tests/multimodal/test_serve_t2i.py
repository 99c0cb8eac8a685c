import base64
import io


def test_images_generations_takes_free_text_and_negative_prompt(t2i_run):
    from fastapi.testclient import TestClient
    from PIL import Image

    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    app = create_app(Registry([f"t2i={t2i_run}"]), load_in_background=False)
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={"model": "t2i", "prompt": "a pair of trainers", "n": 2,
                                                    "negative_prompt": "a bag", "steps": 2, "seed": 1})
        assert r.status_code == 200, r.text
        d = r.json()["data"]
        assert len(d) == 2 and d[0]["parameters"]["negative_prompt"] == "a bag"
        with Image.open(io.BytesIO(base64.b64decode(d[0]["b64_json"]))) as im:
            assert im.text["prompt"] == "a pair of trainers" and im.text["negative_prompt"] == "a bag"
        again = c.post("/v1/images/generations", json={"model": "t2i", "prompt": "a pair of trainers", "n": 2,
                                                        "negative_prompt": "a bag", "steps": 2, "seed": 1}).json()
        assert again["data"][0]["b64_json"] == d[0]["b64_json"]  # same request, same image
        r = c.post("/v1/images/generations", json={"model": "t2i", "prompt": "x" * 1001})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_models_list_says_text_conditioned_and_playground_has_a_prompt_box(t2i_run):
    from fastapi.testclient import TestClient

    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    app = create_app(Registry([f"t2i={t2i_run}"]), load_in_background=False)
    with TestClient(app) as c:
        info = [m for m in c.get("/v1/models").json()["data"] if m["id"] == "t2i"][0]
        page = c.get("/").text
    assert info["text_conditioned"] is True and info["conditional"] is False
    assert 'id="image-prompt"' in page and 'id="image-negative"' in page
