"""The mirror predictor: hearth/demo's inputs (crates/hearth-server/src/schema.rs, FIELDS)
as a Cog predictor that streams a ConcatenateIterator[str], for scripts/cog-diff.sh.

It generates `max_tokens` chunks (one every MIRROR_TOKEN_SECONDS) and logs one line at
the end, as hearth does, so both servers can be sent the same requests and compared.
MIRROR_SETUP_SECONDS makes setup slow (to observe STARTING); MIRROR_SETUP_FAIL makes
it fail (SETUP_FAILED).
"""

import os
import time
from typing import Optional

from cog import BasePredictor, ConcatenateIterator, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        print("setup: loading the mirror model")
        time.sleep(float(os.environ.get("MIRROR_SETUP_SECONDS", "0")))
        if os.environ.get("MIRROR_SETUP_FAIL"):
            raise RuntimeError("mirror setup failed on purpose")
        print("setup: done")

    def predict(
        self,
        prompt: str = Input(description="Prompt", default=""),
        system_prompt: str = Input(
            description="System prompt to send to the model (through its chat template).",
            default="",
        ),
        max_tokens: int = Input(
            description="The maximum number of tokens the model should generate as output.",
            default=512,
            ge=1,
        ),
        min_tokens: int = Input(
            description="The minimum number of tokens the model should generate as output.",
            default=0,
            ge=0,
        ),
        temperature: float = Input(
            description="The value used to modulate the next token probabilities. 0 is greedy.",
            default=0.6,
            ge=0,
            le=5,
        ),
        top_p: float = Input(
            description="Sample from the smallest set of tokens whose cumulative probability reaches top_p.",
            default=0.9,
            ge=0,
            le=1,
        ),
        top_k: int = Input(
            description="Sample from the top_k most likely tokens; 0 (or -1) turns it off.",
            default=50,
            ge=-1,
            le=512,  # hearth/demo's vocabulary: hearth bounds top_k by the model's
        ),
        min_p: float = Input(
            description="Drop tokens less likely than min_p times the most likely one.",
            default=0.0,
            ge=0,
            le=1,
        ),
        presence_penalty: float = Input(description="Presence penalty", default=0.0, ge=-2, le=2),
        frequency_penalty: float = Input(description="Frequency penalty", default=0.0, ge=-2, le=2),
        repetition_penalty: float = Input(
            description="Repetition penalty (1 is off).", default=1.0, ge=0.01, le=10
        ),
        stop_sequences: str = Input(
            description="A comma-separated list of sequences to stop generation at.", default=""
        ),
        prompt_template: str = Input(
            description="A template to format the prompt with: {prompt} and {system_prompt} are substituted. Empty uses the model's chat template.",
            default="",
        ),
        seed: Optional[int] = Input(
            description="Random seed. Leave blank to randomize the seed.",
            default=None,
            ge=0,
            le=9223372036854775807,  # hearth_runtime::limits::SEED_MAX, on every API
        ),
        ignore_eos: bool = Input(
            description="Keep generating past end-of-sequence tokens (for benchmarks).",
            default=False,
        ),
        # hearth's structured-output inputs; the mirror only declares them.
        json_schema: str = Input(
            description="Structured output: a JSON Schema (as an object, or a string holding one) the output must match. Keywords hearth cannot enforce are refused (422), never ignored; see the README.",
            default="",
        ),
        regex: str = Input(
            description="Structured output: a regular expression (Rust regex syntax) the whole output must match.",
            default="",
        ),
        grammar: str = Input(
            description="Structured output: a grammar in llguidance's Lark syntax the output must match.",
            default="",
        ),
    ) -> ConcatenateIterator[str]:
        delay = float(os.environ.get("MIRROR_TOKEN_SECONDS", "0.02"))
        for i in range(max_tokens):
            time.sleep(delay)
            yield f"t{i} "
        # hearth logs one summary line at the end of a prediction; so does the mirror.
        print(f"Prompt: {len(prompt)} characters. Generated {max_tokens} tokens.")
