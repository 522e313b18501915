"""Instruction tuning: a causal LM learns to answer a prompt with its response.

Each example is `template` filled with the prompt, then the response and EOS. The loss
covers the response tokens (and EOS) only: prompt positions are labelled IGNORE_INDEX, the
supervised fine-tuning objective of InstructGPT (Ouyang et al., 2022) and Alpaca. Examples
are never packed into each other: each is one row, padded per batch on the right. The
template is a task option, saved with the model, so `llm generate` wraps prompts the same
way after tuning. The special tokens a template spells ("<|im_start|>", ...) are control
tokens; text in the data that spells one stays ordinary text (`Tokenizer.encode_template`).

The model exports to Hugging Face as a causal LM whose tokenizer carries the template as a Jinja
`chat_template` (`InstructionOptions.chat_template`): `apply_chat_template` on a user message gives
exactly the ids llm trained on, and an assistant message continues with the response and EOS. The
loader reads that template back (`from_chat_template`), so the export is an instruction model again.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string

from llm.config import ConfigError
from llm.errors import UserError
from llm.kernels.reference import IGNORE_INDEX
from llm.tasks.causal_lm import CausalLM, CausalLMTask

DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclasses.dataclass
class InstructionOptions:
    template: str = DEFAULT_TEMPLATE  # the text before the response; "{prompt}" marks the prompt

    def validate(self, path: str = "task") -> None:
        if self.template.count("{prompt}") != 1:
            raise ConfigError(f"{path}.template", f"must hold {{prompt}} exactly once, got {self.template!r}")

    def format(self, prompt: str) -> str:
        """The template with the prompt in place (plain replacement: braces in prompts stay as they are)."""
        return self.template.replace("{prompt}", prompt)

    def encode(self, tok, prompt: str) -> list[int]:
        """Token ids of the templated prompt: the template's special tokens as control tokens, the prompt as text."""
        return tok.encode_template(self.template, prompt)

    def chat_template(self, eos_token: str) -> str:
        """A Jinja chat template (transformers' `chat_template`) that renders a user message as this
        template around its content and an assistant message as its content followed by `eos_token`;
        other roles raise. Strings are JSON literals, which Jinja reads as the same string."""
        before, after = (json.dumps(part, ensure_ascii=False) for part in self.template.split("{prompt}"))
        return CHAT_TEMPLATE.format(before=before, after=after, eos=json.dumps(eos_token, ensure_ascii=False))

    @classmethod
    def from_chat_template(cls, text: str) -> InstructionOptions | None:
        """The options whose `chat_template` is `text` (any EOS), or None for another template."""
        match = re.fullmatch(CHAT_TEMPLATE_PATTERN, text)
        if match is None:
            return None
        before, after = (json.loads(match[name]) for name in ("before", "after"))
        return cls(template=before + "{prompt}" + after)


# Jinja; {before}, {after} and {eos} are JSON string literals (json.dumps), the one form llm writes and reads back
CHAT_TEMPLATE = (
    "{{%- for message in messages -%}}"
    "{{%- if message['role'] == 'user' -%}}{{{{ {before} + message['content'] + {after} }}}}"
    "{{%- elif message['role'] == 'assistant' -%}}{{{{ message['content'] + {eos} }}}}"
    "{{%- else -%}}{{{{ raise_exception('this instruction template has user and assistant turns only') }}}}"
    "{{%- endif -%}}"
    "{{%- endfor -%}}"
)
CHAT_TEMPLATE_PATTERN = "".join(
    re.escape(text) + (f'(?P<{name}>"(?:[^"\\\\]|\\\\.)*")' if name else "")
    for text, name, _, _ in string.Formatter().parse(CHAT_TEMPLATE)
)


class InstructionLM(CausalLM):
    """A causal LM (see CausalLM) that remembers its prompt template."""

    task = "instruction"

    def __init__(self, cfg, options: InstructionOptions | None = None):
        super().__init__(cfg, options or InstructionOptions())


def encode_example(tok, template: InstructionOptions, prompt: str, response: str, eos: int, max_len: int):
    """(input_ids, labels) of one example, each at most max_len long: the tokens of
    template(prompt) + response + EOS shifted by one; labels are IGNORE_INDEX where the target
    is a prompt token. Returns None when the prompt leaves no room for a response token."""
    from llm.data.tokenizer import head_text

    # a tokenizer's memory grows with its input: a text longer than the window is cut first
    p = template.encode(tok, head_text(prompt, max_len + 1))
    r = tok.encode(head_text(response, max_len + 1)) + [eos]
    if len(p) >= max_len + 1:
        return None
    ids = (p + r)[: max_len + 1]
    targets = ([IGNORE_INDEX] * len(p) + r)[: max_len + 1]
    return ids[:-1], targets[1:]


class InstructionTask(CausalLMTask):
    name = "instruction"
    model_class = InstructionLM
    Options = InstructionOptions
    packs_documents = False  # one example per row, never packed

    def hf_architecture(self, cfg):
        """A causal LM's; the template goes to the tokenizer's chat_template (`hf_chat_template`)."""
        return CausalLMTask().hf_architecture(cfg)

    def hf_chat_template(self, eos_token):
        if eos_token is None:
            raise UserError(
                "an instruction model keeps its template in the Hugging Face tokenizer's chat_template, "
                "which ends each response with EOS: give a tokenizer.json whose EOS the model knows"
            )
        return self.options.chat_template(eos_token)

    def shard_stream(self, cfg, data, path, seed, rank, world_size):
        raise UserError(
            f"{path}: instruction tuning reads prompt/response examples from a JSONL, CSV or Parquet file; "
            "token shards pack documents into each other"
        )

    def file_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import Examples, PadCollator, read_table
        from llm.data.examples import as_tensor, text_column
        from llm.tasks.text_classification import pad_id

        columns = read_table(path, [data.prompt_field, data.response_field])
        prompts = text_column(columns[data.prompt_field], path, data.prompt_field)
        responses = text_column(columns[data.response_field], path, data.response_field)
        tok = self.tokenizer(data, "instruction tuning reads text files")
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_id
        if eos is None:
            raise UserError(f"{tok.path}: instruction tuning ends each response with EOS; the tokenizer has none")
        max_len = min(data.seq_len, cfg.max_seq_len)
        samples, cut = [], 0
        for i, (prompt, response) in enumerate(zip(prompts, responses), 1):
            encoded = encode_example(tok, self.options, prompt, response, eos, max_len)
            if encoded is None:
                raise UserError(
                    f"{path}: row {i}: the templated prompt fills data.seq_len={max_len} tokens, "
                    "leaving none for the response"
                )
            ids, labels = encoded
            cut += len(ids) == max_len and labels[-1] != eos
            if max(ids) >= cfg.vocab_size:
                raise UserError(f"{path}: row {i}: token id {max(ids)} is beyond the model's vocabulary")
            samples.append({"input_ids": as_tensor(ids), "labels": as_tensor(labels)})
        if cut:
            from llm.log import logger

            logger.info(f"{path}: {cut} of {len(samples)} responses cut to fit data.seq_len={max_len}")
        return Examples(samples, seed, rank, world_size, name=str(path)), PadCollator(pad_id(tok, cfg))
