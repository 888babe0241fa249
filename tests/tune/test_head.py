"""Scenario head: k-means and logistic initialisation, save -> load parity, refusal on another checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from qanchor.errors import CheckpointError
from qanchor.probe import LR_CS, logistic_probe
from qanchor.tune.head import (
    HEAD_META,
    ScenarioHead,
    kmeans_prototypes,
    logistic_prototypes,
    query_prompt_init,
)
from qanchor.tune.losses import prototype_score


def _blobs(rng: np.random.Generator, centres: np.ndarray, per_blob: int, noise: float) -> np.ndarray:
    return np.concatenate([c + noise * rng.standard_normal((per_blob, centres.shape[1])) for c in centres])


def _match(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance from a row of ``a`` to its nearest row of ``b`` (order-free comparison)."""
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    assert len(set(d.argmin(1))) == len(b)  # a one-to-one match
    return float(d.min(1).max())


def test_kmeans_prototypes_are_normalised_class_centres():
    rng = np.random.default_rng(0)
    centres = {c: rng.standard_normal((4, 16)) * 3 for c in (0, 1)}  # 4 well-separated blobs per class
    x = np.concatenate([_blobs(rng, centres[0], 50, 0.05), _blobs(rng, centres[1], 30, 0.05)]).astype(np.float32)
    y = np.array([0] * 200 + [1] * 120)
    protos, plabels = kmeans_prototypes(x, y, per_class=4, seed=0)
    assert protos.shape == (8, 16) and plabels.tolist() == [0] * 4 + [1] * 4
    assert torch.allclose(protos.norm(dim=1), torch.ones(8), atol=1e-6)
    for c in (0, 1):
        ref = KMeans(n_clusters=4, n_init=10, random_state=0).fit(x[y == c]).cluster_centers_
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        assert _match(protos[plabels == c].numpy(), ref) < 1e-4  # same centres as scikit-learn's k-means
        true = centres[c] / np.linalg.norm(centres[c], axis=1, keepdims=True)
        assert _match(protos[plabels == c].numpy(), true) < 0.02


def test_kmeans_small_classes_get_fewer_prototypes_and_runs_are_deterministic():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 8)).astype(np.float32)
    y = np.array([0] * 20 + [1] * 3)
    protos, plabels = kmeans_prototypes(x, y, per_class=4, seed=3)
    assert plabels.tolist() == [0] * 4 + [1] * 3
    again, _ = kmeans_prototypes(x, y, per_class=4, seed=3)
    assert torch.equal(protos, again)
    _, plabels = kmeans_prototypes(x, y, per_class=4, seed=3, min_users=8)  # 20 // 8 = 2; 3 users -> still 1
    assert plabels.tolist() == [0, 0, 1]
    protos, _ = kmeans_prototypes(x, y, per_class=4, seed=3, min_users=100)  # one prototype = the class mean
    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    assert np.allclose(protos.numpy(), means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-5)


def _overlapping_classes(rng: np.random.Generator, n: int = 600, d: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Unit points whose class shows only along one weak direction, under a large shared spread (the regime
    where k-means centres of both classes nearly coincide)."""
    y = (rng.random(n) < 0.15).astype(int)
    x = rng.standard_normal((n, d)) * np.linspace(3.0, 0.5, d) + np.eye(d)[0] * 4.0
    x[:, d - 1] += 0.8 * y
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_logistic_prototypes_score_ranks_like_the_regression():
    x, y = _overlapping_classes(np.random.default_rng(0))
    # The same regression by hand (standardised inputs, C = 1, classes unweighted as in the benchmark's probe).
    mu, sd = x.mean(0), x.std(0)
    ref = LogisticRegression(C=1.0, max_iter=2000).fit((x - mu) / sd, y)
    decision = ref.decision_function((x - mu) / sd)
    w_norm = float(np.linalg.norm(ref.coef_[0] / sd))  # the regression's weight on the unit points themselves
    for temperature in (0.5 / w_norm, 4.0 / w_norm):  # 2 s / t = |w| with s = 0.25; then capped at s = 1
        protos, plabels, log_scale, bias = logistic_prototypes(x, y, temperature=temperature, seed=0, cs=(1.0,))
        assert plabels.tolist() == [0, 1] and torch.allclose(protos.norm(dim=1), torch.ones(2), atol=1e-6)
        score = prototype_score(torch.from_numpy(x).float(), protos, plabels, temperature).numpy()
        # Identical ranking of every user (float32 scores: near-ties may flip), at the regression's logit scale
        # until the prototypes are opposite (s = 1), then at 2 / t.
        assert np.corrcoef(np.argsort(np.argsort(score)), np.argsort(np.argsort(decision)))[0, 1] > 0.9999
        assert abs(roc_auc_score(y, score) - roc_auc_score(y, decision)) < 1e-4
        slope = np.polyfit(decision, score, 1)[0]
        assert abs(slope - min(1.0, 2.0 / (temperature * w_norm))) < 1e-3, (temperature, slope)
        # With the start's log_scale and bias, a head's logits *are* the regression's decision function.
        capped = temperature * w_norm / 2.0 > 1.0
        assert (log_scale == 0.0) != capped and log_scale == pytest.approx(max(np.log(temperature * w_norm / 2), 0.0), abs=1e-3)
        head = ScenarioHead("t", "q", torch.zeros(1, 4), protos, plabels, temperature, "a" * 64, log_scale=log_scale, bias=bias)
        with torch.no_grad():
            calibrated = head.score(torch.from_numpy(x).float()).numpy()
        # (float32 cosines over a small temperature: agreement to ~0.1% of the logits' spread)
        slope, offset = np.polyfit(decision, calibrated, 1)
        assert abs(slope - 1.0) < 2e-3 and abs(offset) < 1e-2, (temperature, slope, offset)
        assert np.abs(calibrated - decision).max() < 0.01 * np.ptp(decision)


def test_logistic_prototypes_of_a_regression_at_its_mean_difference_limit():
    # At the probe grid's smallest C the regression's weight norm is ~1e-4: written into the prototypes at its own
    # scale, the score would be a difference of two nearly equal float32 cosines and rank users by rounding. The
    # start keeps the direction at a resolvable spread and moves the scale into log_scale.
    x, y = _overlapping_classes(np.random.default_rng(0))
    mu, sd = x.mean(0), x.std(0)
    ref = LogisticRegression(C=LR_CS[0], max_iter=2000).fit((x - mu) / sd, y)
    decision = ref.decision_function((x - mu) / sd)
    protos, plabels, log_scale, bias = logistic_prototypes(x, y, temperature=0.1, seed=0, cs=(LR_CS[0],))
    score = prototype_score(torch.from_numpy(x).float(), protos, plabels, 0.1).numpy()
    assert abs(roc_auc_score(y, score) - roc_auc_score(y, decision)) < 1e-4
    assert np.corrcoef(np.argsort(np.argsort(score)), np.argsort(np.argsort(decision)))[0, 1] > 0.9999
    assert log_scale < np.log(0.1)  # the regression's scale is far below the floor's
    head = ScenarioHead("t", "q", torch.zeros(1, 4), protos, plabels, 0.1, "a" * 64, log_scale=log_scale, bias=bias)
    with torch.no_grad():
        calibrated = head.score(torch.from_numpy(x).float()).numpy()
    slope, offset = np.polyfit(decision, calibrated, 1)
    assert abs(slope - 1.0) < 2e-3 and abs(offset) < 1e-2, (slope, offset)


def test_logistic_prototypes_beat_kmeans_when_the_classes_overlap():
    x, y = _overlapping_classes(np.random.default_rng(1))
    t = torch.from_numpy(x).float()
    km_protos, km_labels = kmeans_prototypes(x.astype(np.float32), y, per_class=4, seed=0)
    lr_protos, lr_labels, _, _ = logistic_prototypes(x, y, temperature=0.1, seed=0)
    auc_km = roc_auc_score(y, prototype_score(t, km_protos, km_labels, 0.1).numpy())
    auc_lr = roc_auc_score(y, prototype_score(t, lr_protos, lr_labels, 0.1).numpy())
    assert auc_lr > auc_km + 0.05, (auc_lr, auc_km)
    with pytest.raises(ValueError, match="both classes"):
        logistic_prototypes(x, np.zeros(len(x), int), temperature=0.1, seed=0)
    again = logistic_prototypes(x, y, temperature=0.1, seed=0)
    assert torch.equal(lr_protos, again.prototypes)


def test_logistic_prototypes_start_from_the_benchmarks_probe_on_a_rare_class():
    # 5% positives, weak signal: the step-0 head must score held-out users exactly as the probe it is compared
    # with (qanchor.probe.logistic_probe, the bench's grid, unweighted classes). Class-balanced weights fitted
    # the 30 positives far harder and ranked held-out users differently.
    rng = np.random.default_rng(3)
    n, d = 1200, 32
    y = (rng.random(n) < 0.05).astype(int)
    x = rng.standard_normal((n, d)) + np.outer(y, np.r_[0.6, 0.4, np.zeros(d - 2)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train, test = np.arange(n) < 600, np.arange(n) >= 600
    protos, plabels, _, _ = logistic_prototypes(x[train], y[train], temperature=0.1, seed=0)
    score = prototype_score(torch.from_numpy(x[test]).float(), protos, plabels, 0.1).numpy()
    probe = logistic_probe(y[train], seed=0).fit(x[train], y[train])
    assert abs(roc_auc_score(y[test], score) - roc_auc_score(y[test], probe.decision_function(x[test]))) < 1e-4


def test_query_prompt_init_cycles_query_tokens():
    tokens = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(query_prompt_init(tokens, 2), tokens[:2])
    assert torch.equal(query_prompt_init(tokens, 7), torch.cat([tokens, tokens, tokens[:1]]))


def _head() -> ScenarioHead:
    gen = torch.Generator().manual_seed(0)
    return ScenarioHead("churn", "Will this user stop paying?", torch.randn(6, 32, generator=gen),
                        torch.randn(8, 16, generator=gen), torch.tensor([0] * 4 + [1] * 4), 0.1, "a" * 64,
                        extra={"best_step": 25}, log_scale=0.3, bias=-1.2)


def test_save_load_scores_identically(tmp_path):
    head = _head()
    emb = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    head.save(tmp_path / "churn")
    meta = yaml.safe_load((tmp_path / "churn" / HEAD_META).read_text())
    assert {"task", "query", "num_prompt_tokens", "prototypes_per_class", "temperature", "checkpoint_hash",
            "qanchor_version"} <= set(meta)
    assert meta["num_prompt_tokens"] == 6 and meta["prototypes_per_class"] == 4 and meta["best_step"] == 25
    loaded = ScenarioHead.load(tmp_path / "churn", checkpoint_hash="a" * 64)
    assert torch.equal(loaded.prompt, head.prompt) and torch.equal(loaded.prototypes, head.prototypes)
    assert torch.equal(loaded.prototype_labels, head.prototype_labels)
    assert torch.equal(loaded.score(emb), head.score(emb))
    assert (loaded.task, loaded.query, loaded.base_temperature) == (head.task, head.query, head.base_temperature)
    assert torch.equal(loaded.log_scale, head.log_scale) and torch.equal(loaded.bias, head.bias)
    assert meta["effective_temperature"] == pytest.approx(0.1 * np.exp(-0.3)) and meta["bias"] == pytest.approx(-1.2)


def test_scale_and_bias_enter_the_score_and_old_heads_load_without_them(tmp_path):
    from safetensors.torch import load_file, save_file

    head = _head()
    emb = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    plain = prototype_score(emb, head.prototypes, head.prototype_labels, 0.1)
    # exp(0.3) times the logits, then + bias on the positive side: the score is affine in the plain one here
    # only with one prototype per class, so compare against the explicit form.
    expected = prototype_score(emb, head.prototypes, head.prototype_labels, 0.1 * np.exp(-0.3)) - 1.2
    assert torch.allclose(head.score(emb), expected, atol=1e-5) and not torch.allclose(head.score(emb), plain)
    # A head written before the scale and bias existed has neither tensor: it scores exactly as it did.
    head.save(tmp_path / "h")
    tensors = load_file(str(tmp_path / "h" / "head.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in ("log_scale", "bias")}, str(tmp_path / "h" / "head.safetensors"))
    old = ScenarioHead.load(tmp_path / "h")
    assert old.log_scale.item() == 0.0 and old.bias.item() == 0.0 and old.temperature.item() == pytest.approx(0.1)
    assert torch.equal(old.score(emb), plain)


def test_refuses_other_checkpoint_and_missing_files(tmp_path):
    _head().save(tmp_path / "h")
    with pytest.raises(CheckpointError, match="re-run `qanchor prompt-tune`"):
        ScenarioHead.load(tmp_path / "h", checkpoint_hash="b" * 64)
    assert ScenarioHead.load(tmp_path / "h").checkpoint_hash == "a" * 64  # no hash given: no check
    with pytest.raises(CheckpointError, match="not a scenario head"):
        ScenarioHead.load(tmp_path / "nothing")


def test_prototypes_stay_unit_norm_while_trained():
    head = _head()
    opt = torch.optim.SGD(head.parameters(), lr=10.0)
    head.score(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert torch.allclose(head.prototypes.norm(dim=1), torch.ones(8), atol=1e-6)


def test_whitening_equalises_variance_and_round_trips(tmp_path):
    from qanchor.tune.head import apply_whitening, fit_whitening

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen) @ torch.diag(torch.tensor([3.0, 1.0, 0.3, 0.1, 1e-2, 1e-3]))
    x = x @ torch.linalg.qr(torch.randn(6, 6, generator=gen))[0]  # rotate: the scales are not axis-aligned
    whitening = fit_whitening(x, eps=1e-12)
    cov = torch.cov(apply_whitening(x, whitening).T)
    assert torch.allclose(cov, torch.eye(6), atol=1e-3)
    head = ScenarioHead("t", "q", torch.randn(2, 8, generator=gen), torch.randn(4, 6, generator=gen),
                        torch.tensor([0, 0, 1, 1]), 0.1, "a" * 64, whitening=whitening)
    head.save(tmp_path / "w")
    loaded = ScenarioHead.load(tmp_path / "w")
    assert torch.equal(loaded.whiten_matrix, head.whiten_matrix) and torch.equal(loaded.score(x), head.score(x))
    # The score is the prototype score of the whitened embedding.
    from qanchor.tune.losses import prototype_score

    whitened = apply_whitening(x, (head.whiten_mean, head.whiten_matrix))
    expected = prototype_score(whitened, head.prototypes, head.prototype_labels, 0.1)
    assert torch.equal(head.score(x), expected)


def test_two_heads_for_one_task_are_refused_not_one_dropped(tmp_path):
    """Rows are named head:<task>: a second head of the same task silently replaced the first."""
    from qanchor.tune.head import load_heads

    for name in ("a", "b"):
        ScenarioHead("churn", "Will this user stop paying?", torch.zeros(2, 8),
                     torch.nn.functional.normalize(torch.ones(2, 4), dim=-1), torch.tensor([0, 1]), 0.1,
                     "a" * 64).save(tmp_path / name / "churn")
    assert list(load_heads(tmp_path / "a")) == ["churn"]
    with pytest.raises(CheckpointError, match="two heads for task 'churn'"):
        load_heads([tmp_path / "a", tmp_path / "b"])


def test_a_head_nobody_asked_for_does_not_stop_the_load_of_the_others(tmp_path):
    """load_heads(tasks=...) checked every head's checkpoint before keeping the asked ones: a stale head of another task
    in the same prompt-tune output aborted the load of the one asked for."""
    from qanchor.tune.head import load_heads

    protos, labels = torch.nn.functional.normalize(torch.ones(2, 4), dim=-1), torch.tensor([0, 1])
    ScenarioHead("churn", "Will this user stop paying?", torch.zeros(2, 8), protos, labels, 0.1, "a" * 64).save(tmp_path / "churn")
    ScenarioHead("coupon", "Will this user redeem?", torch.zeros(2, 8), protos, labels, 0.1, "b" * 64).save(tmp_path / "coupon")
    assert list(load_heads(tmp_path, tasks=["churn"], checkpoint_hash="a" * 64)) == ["churn"]
    with pytest.raises(CheckpointError, match="head for task 'coupon' was tuned on checkpoint bbbbbbbbbbbb"):
        load_heads(tmp_path, checkpoint_hash="a" * 64)
    (tmp_path / "coupon" / "head.safetensors").write_bytes(b"damaged")  # nor may its damaged weights
    assert list(load_heads(tmp_path, tasks=["churn"], checkpoint_hash="a" * 64)) == ["churn"]
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_heads(tmp_path, tasks=["coupon"])
