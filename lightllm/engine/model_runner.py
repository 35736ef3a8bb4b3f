"""Turns a scheduled step into one ragged forward pass and samples the sequences that need a token."""

from __future__ import annotations

import torch

from lightllm.engine.distributed import StepBroadcaster, StepInputs
from lightllm.engine.image_embedder import ImageEmbedder
from lightllm.engine.kv_cache import ReqToTokenTable, TokenKVPool
from lightllm.engine.lora import LoraSync
from lightllm.engine.sampler import Sampler
from lightllm.engine.scheduler import SampledToken, ScheduledChunk
from lightllm.engine.sequence import Sequence
from lightllm.engine.speculative import accept_draft
from lightllm.kernels import cpu as cpu_kernels
from lightllm.models.layers import AttentionMetadata, PrefillSegment, causal_mask
from lightllm.models.decoder import LlamaModel
from lightllm.models.mrope import PromptPositions
from lightllm.models.lora.batch import LoraBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: TokenKVPool, table: ReqToTokenTable, sampler: Sampler,
                 broadcaster: StepBroadcaster | None = None, images: ImageEmbedder | None = None):
        """`broadcaster`: under tensor parallelism, sends each step's inputs to the other ranks. `images`: the
        prompts' image embeddings (vision-language models)."""
        self.images = images
        self.model = model
        self.broadcaster = broadcaster
        self.pool = pool
        self.table = table
        self.sampler = sampler
        self.device = model.device
        self.windows = model.attention_windows  # each distinct window the layers use (None: global)
        self.lora_outbox = None  # LoraOutbox under tensor parallelism with LoRA: what the other ranks must mirror

    def build_metadata(self, plan: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        ids: list[int] = []
        positions: list[int] = []
        slot_indices: list[torch.Tensor] = []
        prefill: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_slots: list[int] = []
        decode_lens: list[int] = []
        logit_rows: list[int] = []
        # M-RoPE (Qwen2-VL): [3, rows] positions when a sequence of the step holds images
        mrope_rows: list[torch.Tensor] | None = [] if self._uses_mrope(plan) else None
        row = 0
        for chunk in plan:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            end = start + n
            ids.extend(seq.all_ids[start:end - len(chunk.draft)] + chunk.draft)
            if mrope_rows is not None:
                mrope_rows.append(self._mrope_positions(seq).slice(start, end))
            else:
                positions.extend(range(start, end))
            slot_indices.append(self.table.table[seq.slot, start:end])
            if n == 1 or chunk.draft:
                # a drafted chunk is n decode queries of one sequence, each seeing the context up to itself:
                # the same attention arithmetic as decoding those tokens one step at a time
                decode_rows.extend(range(row, row + n))
                decode_slots.extend([seq.slot] * n)
                decode_lens.extend(range(start + 1, end + 1))
            else:
                context = self.table.table[seq.slot, :end]
                if self.broadcaster is not None:
                    context = context.clone()  # pickling a view would send the whole table to the other ranks
                runs = self._bidirectional_runs(chunk)
                prefill.append(PrefillSegment(row, row + n, context,
                                              {w: causal_mask(n, end, w, self.device, runs) for w in self.windows}))
            row += n
            if chunk.samples:  # a drafted chunk needs the model's choice after every one of its tokens
                logit_rows.extend(range(row - 1 - len(chunk.draft), row))
        meta = AttentionMetadata(slot_indices=torch.cat(slot_indices), prefill=prefill)
        if decode_rows and self.model.uses_paged_decode_kernel:
            meta.decode_token_idx = torch.tensor(decode_rows, device=self.device)
            meta.decode_lens = torch.tensor(decode_lens, device=self.device)
            if self.broadcaster is None:
                meta.table = self.table.table
                meta.decode_req_slots = torch.tensor(decode_slots, device=self.device)
            else:  # the other ranks have no req_to_token table: send the decoding rows themselves
                slots = torch.tensor(decode_slots, device=self.device)
                meta.table = self.table.table[slots, :max(decode_lens)].contiguous()
                meta.decode_req_slots = torch.arange(len(decode_slots), device=self.device)
        elif decode_rows:
            max_len = max(decode_lens)
            lens = torch.tensor(decode_lens, device=self.device).unsqueeze(1)
            k_pos = torch.arange(max_len, device=self.device).unsqueeze(0)
            meta.decode_token_idx = torch.tensor(decode_rows, device=self.device)
            meta.decode_kv_indices = self.table.table[torch.tensor(decode_slots, device=self.device), :max_len]
            for window in self.windows:
                mask = k_pos < lens
                if window is not None:
                    mask &= k_pos >= lens - window
                # Equal lengths and no window: nothing to mask, and SDPA takes its faster unmasked path.
                meta.decode_masks[window] = None if bool(mask.all()) else mask[:, None, None, :]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        if mrope_rows is not None:
            pos = torch.cat(mrope_rows, dim=1).to(self.device)
        else:
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return input_ids, pos, meta, logit_rows

    def _uses_mrope(self, plan: list[ScheduledChunk]) -> bool:
        return getattr(self.model, "uses_mrope", False) and any(chunk.seq.images for chunk in plan)

    def _mrope_positions(self, seq: Sequence) -> PromptPositions:
        """The sequence's M-RoPE positions, laid out at its first step from its images' token grids."""
        if seq.mrope is None:
            grids = [(image.offset, image.length, *self.images.encoder.token_grid(image.data))
                     for image in seq.images] if seq.images else []
            seq.mrope = PromptPositions.build(len(seq.prompt_ids), grids)
        return seq.mrope

    def _bidirectional_runs(self, chunk: ScheduledChunk) -> list[tuple[int, int]]:
        """The image runs a prefill chunk's queries attend within both ways (Gemma 3; the scheduler keeps each
        run in one chunk, or a cached head and one chunk)."""
        if not self.model.bidirectional_images:
            return []
        start, end = chunk.start, chunk.start + chunk.num_tokens
        return [(image.offset, image.offset + image.length) for image in chunk.seq.images
                if image.offset < end and image.offset + image.length > start]

    @staticmethod
    def lora_batch(plan: list[ScheduledChunk]) -> LoraBatch | None:
        """The step's adapters by row (rows follow the plan's chunks, as build_metadata lays them out)."""
        runs, row = [], 0
        for chunk in plan:
            runs.append((chunk.seq.lora, row, chunk.num_tokens))
            row += chunk.num_tokens
        return LoraBatch.from_runs(runs)

    def sync_lora(self) -> None:
        """Send the other ranks the adapter loads/drops made outside a step (at start, a dynamic load)."""
        if self.broadcaster is not None and self.lora_outbox is not None and self.lora_outbox.pending:
            self.broadcaster.send(LoraSync(self.lora_outbox.take()))

    def _lora_for_ranks(self, plan: list[ScheduledChunk], lora: LoraBatch | None) -> tuple[list, list | None]:
        """The adapter loads/drops the other ranks apply before this step, and its rows' adapters by key."""
        ops = self.lora_outbox.take() if self.lora_outbox is not None else []
        if lora is None:
            return ops, None
        runs, row = [], 0
        for chunk in plan:
            runs.append((None if chunk.seq.lora is None else chunk.seq.lora.key, row, chunk.num_tokens))
            row += chunk.num_tokens
        return ops, runs

    def execute(self, plan: list[ScheduledChunk]) -> dict[str, SampledToken]:
        input_ids, positions, meta, logit_rows = self.build_metadata(plan)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        lora = self.lora_batch(plan)
        # the vision encoder runs on rank 0 only: the step's image rows travel to the other ranks with its inputs
        embeds = self.images.input_embeds(plan) if self.images is not None else None
        if self.broadcaster is not None:
            self.broadcaster.send(StepInputs(input_ids, positions, meta, rows, *self._lora_for_ranks(plan, lora),
                                             embeds=embeds))
        logits = self.model.forward(input_ids, positions, meta, self.pool.k, self.pool.v, rows, lora, embeds=embeds)
        sampling = [c for c in plan if c.samples]
        if not sampling:
            return {}
        # each sampling chunk's logits: its last row, or one row per token when it carries a draft
        rows_of, at = [], 0
        for chunk in sampling:
            rows_of.append(at + len(chunk.draft))
            at += 1 + len(chunk.draft)
        plain = [i for i, chunk in enumerate(sampling) if not chunk.draft]
        plain_logits = logits if len(plain) == len(sampling) else logits[[rows_of[i] for i in plain]]
        results: dict[str, SampledToken] = {}
        if plain:
            picked = self.sampler(plain_logits, [sampling[i].seq for i in plain])
            results.update((sampling[i].seq.rid, token) for i, token in zip(plain, picked))
        for i, chunk in enumerate(sampling):
            if chunk.draft:  # greedy verification (only such requests draft): one argmax per position
                predicted = cpu_kernels.argmax_rows(logits[rows_of[i] - len(chunk.draft):rows_of[i] + 1]).tolist()
                accepted, bonus = accept_draft(chunk.draft, predicted)
                results[chunk.seq.rid] = SampledToken(bonus, accepted=accepted)
        sampling_seqs = [c.seq for c in sampling]
        sampled = [results[seq.rid] for seq in sampling_seqs]
        for seq, token in zip(sampling_seqs, sampled):
            if seq.grammar is not None:
                seq.grammar.accept_token(token.token_id)
        return {seq.rid: token for seq, token in zip(sampling_seqs, sampled)}
