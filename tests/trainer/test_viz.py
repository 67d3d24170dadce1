"""Samples for inspection (``log_samples_every``) and the token-credit map (``cepo viz``)."""

from __future__ import annotations

import html.parser
import json
import os

import pytest
import torch

import cepo_kernels as ck
from cepo import cli
from cepo.config import load_config
from cepo.samples import build_sample_records, read_samples, samples_path, write_samples
from cepo.train import Trainer
from cepo.viz import VizError, fmt, ratio, visualize
from tests.trainer.conftest import make_config


@pytest.fixture(scope="module")
def cepo_step(assets, tmp_path_factory):
    """One CEPO step (lam 1) with sample logging on; the Scored object the step computed."""
    out = str(tmp_path_factory.mktemp("samples") / "run")
    cfg = load_config(
        make_config(
            assets,
            out,
            rollout__prompts_per_step=4,
            log_samples_every=1,
            log_samples_groups=3,
            # a reward with correct and rejected rollouts in most groups, so r- exists
            reward__functions=["tests.trainer.rewards:digit_count"],
            algorithm__reject_threshold=0.3,
        )
    )
    trainer = Trainer(cfg)
    captured = {}
    score = trainer.experience.score

    def spy(*args, **kw):
        captured["scored"] = score(*args, **kw)
        return captured["scored"]

    trainer.experience.score = spy
    trainer.step(1)
    trainer.step(2)  # a second file
    return {"dir": out, "cfg": cfg, "trainer": trainer, "scored": captured["scored"]}


def test_samples_hold_what_the_step_computed(cepo_step):
    cfg, scored = cepo_step["cfg"], cepo_step["scored"]
    assert os.path.isfile(samples_path(cepo_step["dir"], 1))
    records = read_samples(samples_path(cepo_step["dir"], 2))  # the spy holds step 2's Scored
    assert 1 <= len(records) <= cfg.log_samples_groups
    G = cfg.rollout.group_size
    tok = cepo_step["trainer"].tokenizer
    for rec in records:
        assert rec["step"] == 2 and rec["algorithm"] == "cepo" and rec["lam"] == scored.lam > 0
        assert rec["r_plus"] == rec["answer"]
        assert rec["negative"] == scored.negatives[rec["group"]].value
        if rec["negative"] == "r-":
            assert rec["r_minus"] == scored.r_minus[rec["group"]] is not None
        else:
            assert rec["r_minus"] is None
        assert len(rec["responses"]) == G
        for j, resp in enumerate(rec["responses"]):
            i = rec["group"] * G + j
            n = int(scored.mask[i].sum())
            assert len(resp["tokens"]) == len(resp["token_ids"]) == len(resp["A_t"]) == n
            assert resp["A"] == scored.seq_advantages[i].item()
            for key, t in (("A_t", scored.advantages), ("weight", scored.weights), ("logp_pos", scored.pos)):
                assert resp[key] == t[i, :n].tolist(), key  # exactly the float32 values of the step
            assert resp["logp_neg"] == scored.neg[i, :n].tolist()
            assert resp["logp_old"] == scored.old_logp[i, :n].tolist()
            special = set(tok.all_special_ids)
            assert "".join(t for t, i in zip(resp["tokens"], resp["token_ids"]) if i not in special) == resp["text"]
            assert resp["tokens"] == [tok.decode([t]) for t in resp["token_ids"]]
        # the weights are contrastive_advantage of the logged log-probs
        A = torch.tensor([r["A"] for r in rec["responses"]])
        width = max(len(r["tokens"]) for r in rec["responses"])
        pos, neg = torch.zeros(G, width), torch.zeros(G, width)
        mask = torch.zeros(G, width, dtype=torch.bool)
        for j, r in enumerate(rec["responses"]):
            n = len(r["tokens"])
            pos[j, :n], neg[j, :n], mask[j, :n] = torch.tensor(r["logp_pos"]), torch.tensor(r["logp_neg"]), True
        a_t, w = ck.contrastive_advantage(
            A, pos, neg, lam=rec["lam"], eps_w=rec["eps_w"], mask=mask, return_weights=True, backend="torch"
        )
        for j, r in enumerate(rec["responses"]):
            n = len(r["tokens"])
            torch.testing.assert_close(w[j, :n], torch.tensor(r["weight"]), rtol=0, atol=1e-6)
            torch.testing.assert_close(a_t[j, :n], torch.tensor(r["A_t"]), rtol=0, atol=1e-6)
            delta = (torch.tensor(r["logp_pos"]) - torch.tensor(r["logp_neg"])).tolist()
            assert r["delta"] == delta


def test_samples_off_by_default_and_bounded(assets, tmp_path):
    cfg = load_config(make_config(assets, str(tmp_path / "off"), algorithm__name="grpo"))
    assert cfg.log_samples_every == 0
    Trainer(cfg).step(1)
    assert not os.path.exists(os.path.join(cfg.output_dir, "samples"))
    with pytest.raises(ValueError, match="log_samples_every"):
        load_config(make_config(assets, str(tmp_path / "bad"), log_samples_every=-1))
    with pytest.raises(ValueError, match="log_samples_groups"):
        load_config(make_config(assets, str(tmp_path / "bad"), log_samples_groups=0))


def test_grpo_samples_have_no_teacher_values(assets, tmp_path):
    cfg = load_config(
        make_config(assets, str(tmp_path / "g"), algorithm__name="grpo", log_samples_every=1, log_samples_groups=1)
    )
    Trainer(cfg).step(1)
    (rec,) = read_samples(samples_path(cfg.output_dir, 1))
    assert rec["lam"] == 0 and rec["r_plus"] is None and rec["negative"] is None
    for resp in rec["responses"]:
        assert resp["delta"] is None and resp["weight"] is None
        assert resp["A_t"] == [pytest.approx(resp["A"])] * len(resp["tokens"])
    path = visualize(cfg.output_dir, out=str(tmp_path / "g.html"))[0]
    assert "no teacher pass" in open(path).read()


class _Spans(html.parser.HTMLParser):
    """Token spans of the credit page, in document order, grouped by response."""

    def __init__(self):
        super().__init__()
        self.groups, self.r_plus, self.r_minus, self._code = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "div" and cls == "group":
            self.groups.append([])
        elif tag == "div" and cls.startswith("resp"):
            self.groups[-1].append([])
        elif tag == "span" and cls == "tok":
            self.groups[-1][-1].append(a)
        elif tag == "code" and cls in ("rplus", "rminus"):
            self._code = cls

    def handle_data(self, data):
        if self._code:
            (self.r_plus if self._code == "rplus" else self.r_minus).append(data)
            self._code = None


def test_viz_html_shows_every_token_and_value(cepo_step, tmp_path):
    out = str(tmp_path / "credit.html")
    written = visualize(cepo_step["dir"], step=2, out=out, png=str(tmp_path / "credit.png"))
    assert written == [out, str(tmp_path / "credit.png")]
    assert open(written[1], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(out).read()
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained
    parser = _Spans()
    parser.feed(page)
    records = read_samples(samples_path(cepo_step["dir"], 2))
    assert len(parser.groups) == len(records)
    for rec, shown in zip(records, parser.groups):
        # correct responses first, then wrong ones, as on the page
        resps = [r for r in rec["responses"] if r["correct"]] + [r for r in rec["responses"] if not r["correct"]]
        assert len(shown) == len(resps)
        for resp, spans in zip(resps, shown):
            assert [s["data-tok"] for s in spans] == resp["tokens"]
            assert [s["data-at"] for s in spans] == [fmt(v) for v in resp["A_t"]]
            assert [s["data-delta"] for s in spans] == [fmt(v) for v in resp["delta"]]
            assert [s["data-weight"] for s in spans] == [fmt(v) for v in resp["weight"]]
            assert [s["data-ratio"] for s in spans] == [fmt(ratio(v, resp["A"])) for v in resp["A_t"]]
            for s, d in zip(spans, resp["delta"]):
                assert f"delta_t = {fmt(d)}" in s["title"]  # the numbers on hover
    assert parser.r_plus == [str(r["r_plus"]) for r in records]
    assert parser.r_minus == [str(r["r_minus"]) if r["r_minus"] is not None else "n/a" for r in records]
    # the default step is the last one logged; delta shading is selectable
    assert visualize(cepo_step["dir"], out=str(tmp_path / "last.html"), color="delta")
    assert "step 2" in open(tmp_path / "last.html").read()


def test_viz_records_from_fixed_tensors(tmp_path, assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    texts = ["1+2=3", "7", "\\boxed{3}", "x y"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    mask = torch.zeros(4, width, dtype=torch.bool)
    for i, r in enumerate(ids):
        mask[i, : len(r)] = True
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    A = ck.group_advantages(rewards, 4)
    g = torch.Generator().manual_seed(0)
    pos, neg = -torch.rand(4, width, generator=g), -torch.rand(4, width, generator=g)
    a_t, w = ck.contrastive_advantage(A, pos, neg, lam=0.5, eps_w=0.2, mask=mask, return_weights=True)
    recs = build_sample_records(
        step=7, tokenizer=tok, questions=["Compute 1+2."] * 4, answers=["3"] * 4, responses=ids, texts=texts,
        rewards=rewards.tolist(), seq_adv=A, tok_adv=a_t, mask=mask, group_size=4, n_groups=2, algorithm="cepo",
        lam=0.5, eps_w=0.2, reject_threshold=0.5, old_logp=pos, pos_logp=pos, neg_logp=neg, weights=w,
        r_minus=["7"], negative=["r-"],
    )  # fmt: skip
    assert len(recs) == 1 and recs[0]["r_minus"] == "7"
    assert recs[0]["responses"][3]["tokens"] == ["x", " ", "y"]
    run = str(tmp_path / "run")
    write_samples(run, 7, recs)
    page = open(visualize(run, out=str(tmp_path / "c.html"))[0]).read()
    assert "r-</b> = <code class='rminus'>7</code>" in page
    assert json.loads(open(samples_path(run, 7)).readline())["step"] == 7


def test_viz_errors_are_clear(tmp_path, capsys, cepo_step):
    with pytest.raises(VizError, match="run directory not found"):
        visualize(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VizError, match="no samples .*log_samples_every"):
        visualize(str(tmp_path / "empty"))
    with pytest.raises(VizError, match=r"no samples for step 5 .* logged steps: \[1, 2\]"):
        visualize(cepo_step["dir"], step=5)
    for argv, needle in (
        (["viz", str(tmp_path / "nope")], "run directory not found"),
        (["viz", cepo_step["dir"], "--step", "5"], "no samples for step 5"),
        (["viz", str(tmp_path / "empty")], "has no samples"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cepo viz: error: ") and needle in err[0]
