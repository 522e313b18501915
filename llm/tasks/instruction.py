"""Instruction tuning: a causal LM learns to answer a prompt with its response.

Each example is `template` filled with the prompt, then the response and EOS. The loss
covers the response tokens (and EOS) only: prompt positions are labelled IGNORE_INDEX, the
supervised fine-tuning objective of InstructGPT (Ouyang et al., 2022) and Alpaca. Examples
are never packed into each other: each is one row, padded per batch on the right. The
template is a task option, saved with the model, so `llm generate` wraps prompts the same
way after tuning. The model is a causal LM; it exports to Hugging Face as one.
"""

from __future__ import annotations

import dataclasses

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

    p = tok.encode(template.format(head_text(prompt, max_len + 1)))  # a tokenizer's memory grows with its input
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

    def hf_architecture(self, cfg):
        """A causal LM's: the template has no place in config.json, so a Hugging Face causal LM
        reads back as causal_lm (llm.run.export keeps an instruction model in llm's format)."""
        return CausalLMTask().hf_architecture(cfg)

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
