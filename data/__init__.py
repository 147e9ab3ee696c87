"""Fine-tuning data: LLM-Adapters-format reader, prompt templates, tokenization, batching, packing, default task."""
from data.dataset import (IGNORE_INDEX, TokenizedDataset, batches, collate, epoch_order, grad_accum_steps,
                          holdout_indices, length_grouped_order, split_holdout,
                          load_dataset, load_examples, steps_per_epoch, tokenize_example)
from data.default_task import make_default_task, write_default_task
from data.packing import FLAT_MULTIPLE, PACK_MULTIPLE, Packing, first_fit_rows, pack_micro_batch, padding_share
from data.prompts import RESPONSE_MARKER, TEMPLATES, build_prompt
