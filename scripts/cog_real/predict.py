"""The predictor behind crates/hearth/tests/cog_real.rs: hearth in front of the real
Cog server (cog==0.23.1, the venv scripts/cog-diff.sh builds).

It streams `tokens` chunks ("{prompt}{i} "), one every `delay` seconds, logging a
line before each, and fails after them when `fail` is set. Each run appends its
prompt to the file COG_REAL_RUNS names, so the test can count how many times Cog ran
a prediction (never twice). The test serves it twice: with `x-cog-streaming` in its
schema (what `@cog.streaming` gives) and without (Cog then answers an event stream
with 406).
"""

import os
import time

import cog
from cog import BasePredictor, ConcatenateIterator, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        print("setup: done")

    @cog.streaming
    def predict(
        self,
        prompt: str = Input(description="The prefix of every chunk", default=""),
        tokens: int = Input(description="How many chunks", default=5, ge=0, le=1000),
        delay: float = Input(description="Seconds before each chunk", default=0.05, ge=0, le=60),
        fail: bool = Input(description="Raise after the chunks", default=False),
    ) -> ConcatenateIterator[str]:
        runs = os.environ.get("COG_REAL_RUNS")
        if runs:
            with open(runs, "a") as f:
                f.write(prompt + "\n")
        for i in range(tokens):
            time.sleep(delay)
            print(f"log line {i}")
            yield f"{prompt}{i} "
        if fail:
            raise RuntimeError(f"failed on purpose after {tokens} chunks")
