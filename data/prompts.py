"""Prompt templates. build_prompt(example, template, for_eval) -> the text before the answer;
the answer (training target) is example["output"]. Eval takes the generated text after "### Response:".

Templates:
  "alpaca"        clean Alpaca prompt, the SAME string at train and eval time (default).
  "alpaca-short"  "### Instruction:\\n{instruction}\\n\\n### Response:\\n" -- for the byte-level default task,
                  where the Alpaca preamble alone would cost ~100 tokens.
  "llm-adapters"  LLM-Adapters' strings verbatim, quirks included, as in AGI-Edgerunners/LLM-Adapters
                  finetune.py and commonsense_evaluate.py (copied unchanged into NVlabs/DoRA
                  commonsense_reasoning/). The f-strings there are indented 16 spaces inside the function,
                  so every line after the first starts with 16 spaces. Train (finetune.py generate_prompt
                  with output=""): trailing " " / "  " after the first sentence, blank lines made of 16 spaces,
                  and the prompt ends in "### Response:\\n" + 16 spaces. Eval (commonsense_evaluate.py):
                  truly empty blank lines, a single trailing space only in the no-input variant's first line
                  (none in the with-input one). The eval script only ever passes the instruction (input=None);
                  here a non-empty input is used as its generate_prompt(instruction, input) would.
"""

import re

_IND = " " * 16
_FIELD = re.compile(r"\{(instruction|input)\}")

_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_SHORT = "### Instruction:\n{instruction}\n\n### Response:\n"
_SHORT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# finetune.py generate_prompt, with data_point["output"] = "" (how it builds the user prompt for masking)
_LLMA_TRAIN_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
    f"{_IND}### Input:\n{_IND}{{input}}\n{_IND}\n"
    f"{_IND}### Response:\n{_IND}"
)
_LLMA_TRAIN = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
    f"{_IND}### Response:\n{_IND}"
)
# commonsense_evaluate.py generate_prompt
_LLMA_EVAL_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n"
    f"{_IND}### Input:\n{_IND}{{input}}\n\n"
    f"{_IND}### Response:\n{_IND}"
)
_LLMA_EVAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n"
    f"{_IND}### Response:\n{_IND}"
)

# template -> (train, eval) x (no input, with input)
TEMPLATES = {
    "alpaca": ((_ALPACA, _ALPACA_INPUT), (_ALPACA, _ALPACA_INPUT)),
    "alpaca-short": ((_SHORT, _SHORT_INPUT), (_SHORT, _SHORT_INPUT)),
    "llm-adapters": ((_LLMA_TRAIN, _LLMA_TRAIN_INPUT), (_LLMA_EVAL, _LLMA_EVAL_INPUT)),
}
RESPONSE_MARKER = "### Response:"


def build_prompt(example: dict, template: str = "alpaca", for_eval: bool = False) -> str:
    """The prompt text for one {instruction, input, ...} example; the answer is NOT included."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose from {', '.join(TEMPLATES)}")
    train_pair, eval_pair = TEMPLATES[template]
    no_input, with_input = eval_pair if for_eval else train_pair
    inp = example.get("input") or ""
    fields = {"instruction": example["instruction"], "input": inp}
    # one regex pass, not str.format: instructions may contain braces or "{input}"
    return _FIELD.sub(lambda m: fields[m.group(1)], with_input if inp else no_input)
