"""The chunked loss and the cached reference inside real SFT training, on a tiny model."""

import pytest
import torch
from trl import SFTConfig
from datasets import Dataset

from pipeline.config.schema import DemoConfig
from pipeline.demo.world import build_model, build_tokenizer
from pipeline.losses.stats import select_tokens
from pipeline.losses.token_loss import build_loss
from pipeline.training.reference import ReferenceMismatch, ReferenceTopK
from pipeline.training.train import cache_reference_topk, trainer_config
from pipeline.training import trainer as trainer_module
from pipeline.training.trainer import TokenLossSFTTrainer, last_hidden_states

ARGS = {"max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1, "learning_rate": 1e-2,
        "save_strategy": "no", "report_to": "none"}
TINY = DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64)


@pytest.fixture(autouse=True)
def chunk_every_batch(monkeypatch):
    """The tiny model's logits fit in one chunk, where training takes the full logits: these tests
    are about the chunked path, so it is taken whatever the batch."""
    monkeypatch.setattr(trainer_module, "tokens_per_chunk", lambda vocab, device: 0)


def rows():
    return Dataset.from_list([{"prompt": f"{a}*3=", "completion": str(3 * a)[::-1]} for a in range(10, 34)])


def trainer(tmp_path, loss, chunked=True, ref_model=None, reference_topk=None):
    tokenizer = build_tokenizer()
    return TokenLossSFTTrainer(model=build_model(TINY, tokenizer, seed=0),
                               args=trainer_config(SFTConfig, tmp_path, ARGS, 0),
                               train_dataset=rows(), processing_class=tokenizer, token_loss=build_loss(**loss),
                               ref_model=ref_model, reference_topk=reference_topk, chunked=chunked)


def trained(t):
    lm_head_positions = []
    hook = t.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: lm_head_positions.append(out.shape[1]))
    t.train()
    hook.remove()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in t.model.state_dict().items()}, lm_head_positions


@pytest.mark.parametrize("loss", [{"name": "ce"}, {"name": "eaft", "topk": 5}, {"name": "eksft", "ratio": 0.3}])
def test_chunked_training_equals_full_logits_training(tmp_path, loss):
    tokenizer = build_tokenizer()
    ref = (lambda: build_model(TINY, tokenizer, seed=0)) if loss["name"] == "eksft" else (lambda: None)
    chunked = trainer(tmp_path / "chunked", loss, chunked=True, ref_model=ref())
    full = trainer(tmp_path / "full", loss, chunked=False, ref_model=ref())
    assert chunked.chunked and not full.chunked
    got_losses, got, got_positions = trained(chunked)
    want_losses, want, want_positions = trained(full)
    assert set(got_positions) == {0} and min(want_positions) > 0  # the chunked path made no logits at all
    assert got_losses == pytest.approx(want_losses, rel=1e-4)
    assert got_losses[-1] < got_losses[0]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)


def test_hidden_states_are_the_ones_the_lm_head_sees(tmp_path):
    t = trainer(tmp_path, {"name": "ce"})
    batch = next(iter(t.get_train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = last_hidden_states(t.model, inputs)
    torch.testing.assert_close(t.model.get_output_embeddings()(hidden), t.model(**inputs).logits)


def build_cache(tmp_path, k, seed=0):
    tokenizer = build_tokenizer()
    model = build_model(TINY, tokenizer, seed=seed)
    metrics = cache_reference_topk(model, tokenizer, rows(), ARGS, 0, k, tmp_path / "topk")
    return model, ReferenceTopK(tmp_path / "topk"), metrics


def test_cached_reference_holds_the_models_top_k_at_each_loss_token(tmp_path):
    model, cache, metrics = build_cache(tmp_path, k=6)
    assert metrics["rows"] == 24 and metrics["tokens"] > 24 and 0 < metrics["tail_mass"] < 1
    t = trainer(tmp_path / "train", {"name": "eksft"}, reference_topk=cache)
    batch = next(iter(t.get_train_dataloader()))  # shuffled: rows in another order than the cache's
    top = cache.lookup(batch)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    z, _, _ = select_tokens(logits, batch["labels"])
    want = torch.log_softmax(z, dim=-1).topk(6, dim=-1)
    assert top.ids.shape == (len(z), 6)
    torch.testing.assert_close(top.logp, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(top.ids.long(), want.indices)

    batch["input_ids"][0, 2] = (batch["input_ids"][0, 2] + 1) % 10 + 4  # a row the cache never saw
    with pytest.raises(ReferenceMismatch, match="row 0 .* not in the cached reference .* --force reference"):
        cache.lookup(batch)


def test_eksft_on_a_cache_of_all_but_one_token_trains_like_eksft_with_the_model(tmp_path):
    # With K = V - 1 the one token left out carries the rest of the mass exactly: the cached KL is exact.
    # The reference differs from the starting policy, or S_KL would be chosen among KLs of 0 by float noise.
    vocab = len(build_tokenizer())
    _, cache, _ = build_cache(tmp_path, k=vocab - 1, seed=1)
    loss = {"name": "eksft", "ratio": 0.3, "lambda_kl": 1.0}
    got_losses, got, _ = trained(trainer(tmp_path / "cached", loss, reference_topk=cache))
    ref_model = build_model(TINY, build_tokenizer(), seed=1)
    want_losses, want, _ = trained(trainer(tmp_path / "model", loss, ref_model=ref_model))
    assert got_losses == pytest.approx(want_losses, rel=1e-4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)


def test_a_batch_whose_logits_fit_in_one_chunk_takes_the_full_logits(tmp_path, monkeypatch):
    """Where the chunked path would hold the whole batch's logits at once anyway, it only costs time."""
    ce = {"name": "ce"}
    tokens = ARGS["per_device_train_batch_size"] * 8  # the batch's positions, at least
    monkeypatch.setattr(trainer_module, "tokens_per_chunk", lambda vocab, device: 10**6)
    _, _, positions = trained(trainer(tmp_path / "fits", ce))
    assert positions and min(positions) > 0  # the LM head made every position's logits
    monkeypatch.setattr(trainer_module, "tokens_per_chunk", lambda vocab, device: tokens // 2)
    _, _, positions = trained(trainer(tmp_path / "exceeds", ce))
    assert set(positions) == {0}  # the chunked path: no logits from the model's forward
