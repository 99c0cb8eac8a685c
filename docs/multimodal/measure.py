"""The README's multimodal numbers: held-out-phrasing class accuracy of fmnist-t2i at several guidance scales, and
the shapes attribute judge on shapes-t2i (seen and held-out combinations).

    python docs/multimodal/measure.py fmnist RUN [--classifier DIR] [--per-class 10] [--steps 20] [--guidance 1 3 5]
    python docs/multimodal/measure.py shapes RUN [--n 50] [--steps 20] [--guidance 1 3]
"""

import argparse
import json

import torch

p = argparse.ArgumentParser()
p.add_argument("what", choices=["fmnist", "shapes"])
p.add_argument("run")
p.add_argument("--classifier")
p.add_argument("--per-class", type=int, default=10)
p.add_argument("--n", type=int, default=50)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--guidance", type=float, nargs="*", default=[1.0, 3.0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--phrasings", choices=["held-out", "training"], default="held-out", help="fmnist: which prompts")
p.add_argument("--judge", default="shapes-judge-40k4.safetensors", help="the trained judge is kept here and reused")
p.add_argument("--judge-renders", type=int, default=40000, help="the judge's training renders (2,000 fresh to test)")
p.add_argument("--judge-epochs", type=int, default=4)
a = p.parse_args()
torch.set_num_threads(a.threads)

if a.what == "fmnist":
    from pathlib import Path

    from aigckit.eval.classifier import load_classifier
    from aigckit.eval.t2i import prompt_accuracy

    clf, manifest = load_classifier(Path(a.classifier) if a.classifier else None)
    trained = manifest.get("training", {})
    print(json.dumps({"classifier_test_accuracy": trained.get("test_accuracy"),
                      "classifier_epochs": trained.get("epochs")}), flush=True)
    for g in a.guidance:
        print(json.dumps(prompt_accuracy(a.run, guidance=g, per_class=a.per_class, steps=a.steps, classifier=clf,
                                         phrasings=a.phrasings)),
              flush=True)
else:
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from aigckit.eval.t2i import ShapesJudge, shapes_accuracy, train_shapes_judge

    if Path(a.judge).exists():
        judge = ShapesJudge()
        judge.load_state_dict(load_file(a.judge))
        judge.eval()
        acc = json.loads(Path(a.judge + ".json").read_text())
    else:
        judge, acc = train_shapes_judge(n=a.judge_renders, epochs=a.judge_epochs)
        save_file(judge.state_dict(), a.judge)
        Path(a.judge + ".json").write_text(json.dumps(acc))
    print(json.dumps({"judge_accuracy_on_fresh_renders": acc}), flush=True)
    for g in a.guidance:
        print(json.dumps(shapes_accuracy(a.run, guidance=g, n=a.n, steps=a.steps, judge_model=judge)), flush=True)
