"""Accuracy and cost of the skill detector (memory/skill_detector.py).

Data: the skill folders of tests/data/skills (``<name>/SKILL.md``, front matter
``name`` + ``description``) and the labelled messages of
tests/data/skill_messages.json (``{"message": ..., "skill": name | null}``; null: no
skill applies). The constants were tuned on the even indices; the odd indices are the
held-out half.

A message counts as correct when the detector's first pick is its skill, or, for a
null message, when it returns nothing. Per skill: precision = correct first picks of
the skill / all first picks of it; recall = correct first picks / messages labelled
with it. Overall precision = correct picks / messages given any pick; overall recall =
correct picks / messages labelled with a skill. ``none`` is the null class (its
precision: of the messages given nothing, how many had no skill).

Latency: ``detect()`` once per message after a warm-up (the model loaded, each text
seen once), ``--rounds`` rounds, with the time of the embedder call and of the numpy
part separately. Single caller, the embedder in a 2-thread pool, as in the app.

``--tune`` re-runs the search the defaults came from, on the even half: keyword
weight, keyword saturation and threshold on a grid, the best accuracy first, ties
broken by the mean of tanh(margin / 0.05) (the margin: how far the right decision is
from flipping), and prints the best cells with their held-out accuracy.

    .venv/bin/python bench/skill_detector.py [--rounds 3] [--tune] [--embeddings auto]

Writes bench/results/skill_detector.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra.embeddings import build_embedder  # noqa: E402
from infra.settings import Settings  # noqa: E402
from memory import skill_detector as sd  # noqa: E402
from memory.skill_detector import MAX_MESSAGE_CHARS, SkillDetector  # noqa: E402

DATA = ROOT / "tests" / "data"
RESULTS = ROOT / "bench" / "results"
NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


def load_skills(folder: Path = DATA / "skills") -> list[tuple[str, str]]:
    """``(name, description)`` of every ``<name>/SKILL.md`` under ``folder``, by name."""
    out: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*/SKILL.md")):
        _, front, _body = path.read_text(encoding="utf-8").split("---", 2)
        meta = yaml.safe_load(front)
        name, description = str(meta["name"]), str(meta["description"])
        if name != path.parent.name or not NAME_RE.match(name) or len(name) > 64:
            raise ValueError(f"{path}: bad skill name {name!r}")
        if not 1 <= len(description) <= 1024:
            raise ValueError(f"{path}: description must be 1-1024 characters")
        out.append((name, description))
    return out


def load_messages(path: Path = DATA / "skill_messages.json") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return rows


def metrics(
    labels: Sequence[str | None], preds: Sequence[str | None], names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, overall and per-class precision/recall, and the confusion counts."""
    pairs = list(zip(labels, preds, strict=True))
    correct = sum(1 for y, p in pairs if y == p)
    picked = [(y, p) for y, p in pairs if p is not None]
    labelled = [(y, p) for y, p in pairs if y is not None]
    per: dict[str, dict[str, Any]] = {}
    for cls in [*names, None]:
        tp = sum(1 for y, p in pairs if y == cls and p == cls)
        n_pred = sum(1 for _, p in pairs if p == cls)
        n_true = sum(1 for y, _ in pairs if y == cls)
        per[cls or "none"] = {
            "n": n_true,
            "precision": tp / n_pred if n_pred else None,
            "recall": tp / n_true if n_true else None,
        }
    confusion: dict[str, dict[str, int]] = {}
    for y, p in pairs:
        row = confusion.setdefault(y or "none", {})
        row[p or "none"] = row.get(p or "none", 0) + 1
    return {
        "n": len(pairs),
        "accuracy": correct / len(pairs) if pairs else 0.0,
        "precision": sum(1 for y, p in picked if y == p) / len(picked) if picked else None,
        "recall": sum(1 for y, p in labelled if y == p) / len(labelled) if labelled else None,
        "per_class": per,
        "confusion": confusion,
    }


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def report_table(title: str, m: dict[str, Any]) -> str:
    lines = [
        f"### {title}: accuracy {m['accuracy']:.3f} on {m['n']} messages, precision "
        f"{_fmt(m['precision'])}, recall {_fmt(m['recall'])}",
        "",
        "| class | n | precision | recall | picked instead |",
        "|---|---:|---:|---:|---|",
    ]
    for cls, row in m["per_class"].items():
        wrong = {k: v for k, v in m["confusion"].get(cls, {}).items() if k != cls}
        misses = ", ".join(f"{k} x{v}" for k, v in sorted(wrong.items())) or ""
        lines.append(
            f"| {cls} | {row['n']} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {misses} |"
        )
    return "\n".join(lines)


def prediction(row: dict[str, Any], detections: Sequence[sd.Detection]) -> dict[str, Any]:
    return {
        "message": row["message"],
        "label": row["skill"],
        "detections": [
            {
                "name": d.name,
                "score": d.score,
                "similarity": d.similarity,
                "keyword_hits": list(d.keyword_hits),
            }
            for d in detections
        ],
    }


def _margins(
    score: np.ndarray, similarity: np.ndarray, y: np.ndarray, thr: float, floor: float
) -> np.ndarray:
    """Per message, how far its right decision is from flipping (> 0: correct)."""
    out = np.empty(len(y))
    for i in range(len(y)):
        row = np.where(similarity[i] >= floor, score[i], -np.inf)
        if y[i] < 0:
            out[i] = thr - row.max()
        else:
            others = np.delete(row, y[i]).max()
            out[i] = min(row[y[i]] - thr, row[y[i]] - others)
    return out


def tune(
    similarity: np.ndarray, mass: np.ndarray, y: np.ndarray, floor: float
) -> list[tuple[float, float, float, float, float, float]]:
    """(even accuracy, soft margin, saturation, weight, threshold, odd accuracy), best first."""
    even, odd = np.arange(len(y))[0::2], np.arange(len(y))[1::2]
    rows = []
    for saturation in (0.5, 1.0, 2.0, 3.0):
        term = 1.0 - np.exp(-mass / saturation)
        for weight in np.arange(0.0, 0.61, 0.05):
            score = similarity + weight * term
            for thr in np.arange(0.10, 0.50, 0.01):
                m_even = _margins(score[even], similarity[even], y[even], thr, floor)
                m_odd = _margins(score[odd], similarity[odd], y[odd], thr, floor)
                rows.append(
                    (
                        float((m_even > 0).mean()),
                        float(np.tanh(m_even / 0.05).mean()),
                        saturation,
                        round(float(weight), 2),
                        round(float(thr), 2),
                        float((m_odd > 0).mean()),
                    )
                )
    rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
    return rows


async def run(args: argparse.Namespace) -> int:
    skills = load_skills()
    names = [n for n, _ in skills]
    rows = load_messages()
    labels: list[str | None] = [r["skill"] for r in rows]
    unknown = {y for y in labels if y is not None and y not in names}
    if unknown:
        raise SystemExit(f"labels name unknown skills: {sorted(unknown)}")
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-embed")
    embedder = build_embedder(Settings(embeddings=args.embeddings), executor)
    print(f"embedder: {embedder.name}; {len(skills)} skills, {len(rows)} messages "
          f"({labels.count(None)} with no skill)")  # fmt: skip
    detector = SkillDetector(embedder, max_active=args.max_active)
    t0 = time.perf_counter()
    await detector.index(skills)
    index_s = time.perf_counter() - t0
    print(f"index (incl. model load on first use): {index_s:.2f} s")
    t0 = time.perf_counter()
    await detector.index(skills)
    reindex_s = time.perf_counter() - t0
    print(f"re-index of {len(skills)} skills ({3 * len(skills)} texts): {reindex_s * 1e3:.0f} ms")

    # Accuracy: every message once, through detect().
    detections = [await detector.detect(r["message"]) for r in rows]
    preds = [d[0].name if d else None for d in detections]
    even = list(range(0, len(rows), 2))
    odd = list(range(1, len(rows), 2))
    parts = {
        "overall": metrics(labels, preds, names),
        "tuning half (even)": metrics([labels[i] for i in even], [preds[i] for i in even], names),
        "held-out half (odd)": metrics([labels[i] for i in odd], [preds[i] for i in odd], names),
    }
    tables = [report_table(title, m) for title, m in parts.items()]
    seconds = sum(1 for d in detections if len(d) > 1)
    errors = [
        f"- [{i}] label {labels[i]}, got {[(d.name, round(d.score, 3)) for d in detections[i]]}: "
        f"{rows[i]['message'][:90]!r}"
        for i in range(len(rows))
        if labels[i] != preds[i]
    ]

    # Latency: warm, single caller.
    detect_ms: list[float] = []
    embed_ms: list[float] = []
    numpy_ms: list[float] = []
    for _ in range(args.rounds):
        for r in rows:
            text = r["message"][:MAX_MESSAGE_CHARS]
            t0 = time.perf_counter()
            await detector.detect(r["message"])
            t1 = time.perf_counter()
            (vector,) = await embedder.embed([text])
            t2 = time.perf_counter()
            detector.select(detector.scores(np.asarray(vector, dtype=np.float32), text))
            t3 = time.perf_counter()
            detect_ms.append((t1 - t0) * 1e3)
            embed_ms.append((t2 - t1) * 1e3)
            numpy_ms.append((t3 - t2) * 1e3)

    def q(xs: list[float], p: float) -> float:
        return float(np.percentile(xs, p))

    latency = {
        "detect_ms": {"p50": statistics.median(detect_ms), "p95": q(detect_ms, 95)},
        "embed_ms": {"p50": statistics.median(embed_ms), "p95": q(embed_ms, 95)},
        "scores_select_ms": {"p50": statistics.median(numpy_ms), "p95": q(numpy_ms, 95)},
    }
    constants = {
        "threshold": detector.threshold,
        "keyword_weight": detector.keyword_weight,
        "min_similarity": detector.min_similarity,
        "second_ratio": detector.second_ratio,
        "keyword_saturation": sd.KEYWORD_SATURATION,
        "max_active": detector.max_active,
    }
    md = [
        f"# Skill detector ({embedder.name})",
        "",
        "constants: " + ", ".join(f"{k}={v}" for k, v in constants.items()),
        "",
        *[t + "\n" for t in tables],
        f"Messages given a second skill (max_active={detector.max_active}): {seconds} "
        f"of {len(rows)}.",
        "",
        "### Errors",
        *errors,
        "",
        f"### Cost ({args.rounds} rounds x {len(rows)} messages, warm, one caller)",
        "",
        "| part | p50 ms | p95 ms |",
        "|---|---:|---:|",
        *[f"| {k} | {v['p50']:.2f} | {v['p95']:.2f} |" for k, v in latency.items()],
        "",
        f"index: {index_s:.2f} s first time (model load), {reindex_s * 1e3:.0f} ms again "
        f"({3 * len(skills)} texts, one embed call).",
    ]

    if args.tune:
        texts = [r["message"][:MAX_MESSAGE_CHARS] for r in rows]
        vectors = np.asarray(await embedder.embed(texts), dtype=np.float32)
        all_scores = [detector.scores(v, t) for v, t in zip(vectors, texts, strict=True)]
        similarity = np.stack([s.similarity for s in all_scores])
        mass = np.stack([s.keyword_mass for s in all_scores])
        y = np.array([names.index(lbl) if lbl else -1 for lbl in labels])
        best = tune(similarity, mass, y, detector.min_similarity)
        md += ["", "### Tuning (even half), best cells", ""]
        md += ["| even acc | soft margin | saturation | weight | threshold | odd acc |"]
        md += ["|---:|---:|---:|---:|---:|---:|"]
        md += [
            f"| {a:.3f} | {s:.3f} | {sat} | {w} | {t} | {o:.3f} |"
            for a, s, sat, w, t, o in best[:10]
        ]

    text = "\n".join(md)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "skill_detector.md").write_text(text + "\n", encoding="utf-8")
    (RESULTS / "skill_detector.json").write_text(
        json.dumps(
            {
                "embedder": embedder.name,
                "constants": constants,
                "metrics": parts,
                "second_skill_messages": seconds,
                "latency": latency,
                "index_s": index_s,
                "reindex_s": reindex_s,
                "predictions": [
                    prediction(r, det) for r, det in zip(rows, detections, strict=True)
                ],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    executor.shutdown(wait=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (default 3)")
    parser.add_argument("--max-active", type=int, default=2)
    parser.add_argument("--tune", action="store_true", help="re-run the grid search")
    parser.add_argument(
        "--embeddings", default="minilm", help="TIERMEM_EMBEDDINGS value (default minilm)"
    )
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
