"""How close EKSFT's cached reference (top-K log-probs) comes to the exact KL(policy || reference).

    python bench/reference_kl.py --policy SFT_MODEL_DIR --reference BASE_MODEL_DIR --data SFT.jsonl --k 4 8 16

For a trained policy and the model it started from, on SFT rows tokenized by TRL as training
does: the mean per-token KL, exact and from the reference's top K for each K, the mean
absolute per-token error, and the reference's mass outside its top K.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from trl import SFTConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.schema import DataSource  # noqa: E402
from pipeline.data.sources import SFT_FIELDS, load_rows
from pipeline.losses.stats import TopK, reverse_kl, select_tokens
from pipeline.training.train import trainer_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    policy = AutoModelForCausalLM.from_pretrained(args.policy).eval()
    reference = AutoModelForCausalLM.from_pretrained(args.reference).eval()
    dataset = load_rows(DataSource(path=str(args.data)), SFT_FIELDS).select(range(args.rows))
    config = trainer_config(SFTConfig, Path(tempfile.mkdtemp()), {"report_to": "none"}, 0)
    trainer = SFTTrainer(model=policy, args=config,
                         train_dataset=dataset, processing_class=tokenizer)
    exact, approx, tail = [], {k: [] for k in args.k}, {k: [] for k in args.k}
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(trainer.train_dataset):
            inputs = {name: v for name, v in batch.items() if name != "labels"}
            logp = torch.log_softmax(select_tokens(policy(**inputs).logits, batch["labels"])[0].float(), -1)
            ref_logp = torch.log_softmax(select_tokens(reference(**inputs).logits, batch["labels"])[0].float(), -1)
            exact.append(reverse_kl(logp, ref_logp))
            for k in args.k:
                top = ref_logp.topk(k, dim=-1)
                approx[k].append(reverse_kl(logp, TopK(top.indices, top.values)))
                tail[k].append(1 - top.values.exp().sum(-1))
    exact_kl = torch.cat(exact)
    print(f"{len(exact_kl)} loss tokens, vocabulary {logp.size(-1)}; exact KL: mean {exact_kl.mean():.4f} nats per token")
    print(f"{'K':>6}{'cached KL':>11}{'mean |error|':>14}{'relative':>10}{'ref. mass outside K':>21}")
    for k in args.k:
        kl = torch.cat(approx[k])
        error = (kl - exact_kl).abs().mean()
        print(f"{k:6}{kl.mean():11.4f}{error:14.4f}{error / exact_kl.mean():10.1%}{torch.cat(tail[k]).mean():21.4f}")


if __name__ == "__main__":
    main()
