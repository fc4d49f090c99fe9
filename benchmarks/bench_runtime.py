"""How much of MoETextEmbedding.embed is spent outside ``session.run`` (tokenising, batching, pooling).

Embeds ``--batch`` texts of exactly ``--tokens`` tokens each (``<s>``/``</s>`` included) in one batch, times
the whole ``embed`` call and the ``session.run`` calls inside it, and prints the median of ``--repeat`` runs
after one warm-up. Target on the full-size model at 32 x 128: outside-run share <= 5%.

    python benchmarks/bench_runtime.py /tmp/full-out --variant moe --batch 32 --tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import time

from nomic_export.runtime import MoETextEmbedding

WORDS = "the quick brown fox jumps over lazy dog while seven wizards quietly judge boxing matches".split()


class TimedSession:
    """Wraps an InferenceSession and adds up the seconds spent in ``run``."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def texts_of_length(model: MoETextEmbedding, count: int, tokens: int) -> list[str]:
    """``count`` distinct texts, each exactly ``tokens`` tokens long after tokenisation (<s>, </s> included)."""
    words = [w for w in WORDS if len(model.tokenizer.encode(w).ids) == 3]  # <s> word </s>: one token each
    texts = [" ".join(words[(i + j) % len(words)] for j in range(tokens - 2)) for i in range(count)]
    got = {len(e.ids) for e in model.tokenizer.encode_batch(texts)}
    if got != {tokens}:
        raise SystemExit(f"could not build texts of exactly {tokens} tokens (got lengths {sorted(got)})")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="an export directory")
    parser.add_argument("--variant", default="moe")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    model = MoETextEmbedding(args.out, variant=args.variant, threads=args.threads)
    timed = model.session = TimedSession(model.session)
    texts = texts_of_length(model, args.batch, args.tokens)
    list(model.embed(texts, batch_size=args.batch))  # warm-up: ORT allocates its arena on the first run
    totals, runs = [], []
    for _ in range(args.repeat):
        timed.seconds = 0.0
        start = time.perf_counter()
        list(model.embed(texts, batch_size=args.batch))
        totals.append(time.perf_counter() - start)
        runs.append(timed.seconds)
    outside = [t - r for t, r in zip(totals, runs)]
    total, run, rest = statistics.median(totals), statistics.median(runs), statistics.median(outside)
    print(
        f"{args.variant} {args.batch}x{args.tokens}: total {total * 1e3:.1f} ms, session.run {run * 1e3:.1f} ms, "
        f"outside run {rest * 1e3:.2f} ms = {100 * rest / total:.2f}% (median of {args.repeat})"
    )


if __name__ == "__main__":
    main()
