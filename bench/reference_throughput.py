"""Benchmark: training samples/s of the authors' LNLN code (github.com/Haoyu-ha/LNLN), the
yardstick of `bench/step_throughput.py --model lnln`.

    python bench/reference_throughput.py [--git-dir DIR] [--batch-size 64] [--threads 2] [--train-steps 0]

Its model and loss files are read at run time from a git mirror of that repository (default
/work/.mirror/Haoyu-ha+LNLN/repo, `git archive HEAD`) into a temporary directory; none of its
code is kept here. Its BERT text encoder is replaced by precomputed features of BERT's output
shape (B, 50, 768), as our `model.text_encoder: features` (the files written there: that
stand-in, `models/bert.py`, and empty package `__init__.py` files). Its MOSI training config
(configs/train_mosi.yaml) at mosi-aligned lengths (50 text, audio and vision steps), batch 64,
on synthetic data of those shapes (data_pipeline.synth, our training masks): its own
training step from train.py, forward on (complete, incomplete) input, `MultimodalLoss`,
backward, AdamW (lr 1e-4, weight decay 1e-4), zero_grad, and each loss term read with
`.item()`. Its code
attends over every position (padding too) and encodes the complete input of every row. Its
MSE terms broadcast (B, 1) predictions against (B,) labels, as in its code; torch's warning
about that is silenced here. Prints `reference_train_samples_per_s=<x>`.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_timing import samples_per_s  # noqa: E402
from data_pipeline.loader import SplitTensors, batch_rows, make_batch  # noqa: E402
from data_pipeline.missing import TrainingMissing  # noqa: E402
from data_pipeline.synth import synthesize  # noqa: E402

DEFAULT_GIT_DIR = "/work/.mirror/Haoyu-ha+LNLN/repo"
# Its text encoder, stood in for by precomputed features: forward returns its input.
BERT_STAND_IN = '''from torch import nn


class BertTextEncoder(nn.Module):
    """Stand-in: the text input already is BERT's last hidden states (B, L, 768)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, text):
        return text
'''


def extract_reference(git_dir: str, into: Path) -> None:
    """Its models/ and core/ packages and configs/ at HEAD, with the BERT stand-in."""
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", "models", "core", "configs"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "models" / "bert.py").write_text(BERT_STAND_IN)
    for package in ("models", "core"):  # regular packages, so that ours does not shadow them
        (into / package / "__init__.py").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", default=DEFAULT_GIT_DIR, help="a clone or mirror of github.com/Haoyu-ha/LNLN")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=0, help="0: enough for ~20 s")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="lnln-reference-") as tmp:
        root = Path(tmp)
        extract_reference(args.git_dir, root)
        sys.path.insert(0, str(root))
        for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[name]  # its `models` package, not ours
        from core.losses import MultimodalLoss
        from models.lnln import build_model
        config = yaml.safe_load((root / "configs" / "train_mosi.yaml").read_text())

    data = synthesize("mosi-aligned", seed=0, scale=0.3)
    spec = data.spec
    config["model"]["feature_extractor"]["input_length"] = [spec.text_len, spec.vision_len, spec.audio_len]
    config["model"]["feature_extractor"]["input_dims"] = [spec.text_dim, spec.vision_dim, spec.audio_dim]
    torch.manual_seed(0)
    model = build_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["base"]["lr"],
                                  weight_decay=config["base"]["weight_decay"])
    loss_fn = MultimodalLoss(config)

    train = SplitTensors.from_arrays(spec, "train", data.split("train"))
    rows = [r for r in batch_rows(len(train), args.batch_size, shuffle=True, seed=0, epoch=0)
            if len(r) == args.batch_size]
    batches = []
    for r in rows[:8]:  # built ahead: its DataLoader prepares batches in worker processes
        b = make_batch(train, r, TrainingMissing(), seed=1, epoch=0)
        n = len(r)
        batches.append(((b.vision.complete, b.audio.complete, b.text.complete),
                        (b.vision.observed, b.audio.observed, b.text.observed),
                        {"sentiment_labels": b.label, "completeness_labels": 1.0 - b.text_missing_fraction,
                         "effectiveness_labels": torch.cat([torch.ones(n * 8), torch.zeros(n * 8)]).long()}))

    def step(i: int) -> None:  # train.py's train(), one iteration
        complete_input, incomplete_input, label = batches[i % len(batches)]
        out = model(complete_input, incomplete_input)
        loss = loss_fn(out, label)
        loss["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        out["sentiment_preds"].cpu()
        for value in loss.values():
            value.item()

    model.train()
    rate, n_steps = samples_per_s(step, args.batch_size, args.train_steps)
    print(f"reference LNLN (BERT as precomputed features) shape=mosi-aligned batch_size={args.batch_size} "
          f"threads={args.threads} params={n_params} train_steps={n_steps}")
    print(f"reference_train_samples_per_s={rate:.1f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
    main()
