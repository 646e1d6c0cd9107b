"""The ``"reduce_scatter"`` exchange: bytes per rank that do not grow with the world size.

The bucket's index range is cut into W contiguous shards (``sizing.shard_cuts``: the same on
every rank, fixed per bucket layout, balanced by the kept-count targets k_p). Per step:

1. Each rank compresses its (gradient + residual) shard by shard, each piece of a parameter
   against its own τ (the piece's share of k_p: exact at a refresh, else the threshold rule's
   estimate times the parameter's scale), into W fixed-capacity wire buffers — the rows of
   one ``[W, nbytes]`` send tensor, written in place — and one ``all_to_all_single`` sends row
   s to rank s.
2. Once the all-to-all is done, rank s sums the W payloads of its shard in rank order
   (``decompress_many``), compresses that sum with its shard residual (fp32, the second error
   feedback, which rank s owns) against τ' (per piece of a parameter in the shard: the k-th
   largest of the piece's sum + residual, k the piece's share of k_p, refreshed on the same
   schedule and band as τ_p and estimated by the same rule in between), keeps the rest in
   the shard residual, and writes the payload in bucket positions (``position_offset``).
3. One all-gather of the W shard payloads; ``decompress_many(average=True)`` of the W disjoint
   shards gives every rank the whole bucket, divided by W, bitwise the same everywhere.

Per rank: (W - 1) rows sent and received in stage 1 and one row sent, W - 1 received in stage
3, each row about 1/W of the allgather buffer: about 3 allgather buffers whatever W is.
Stages 2 and 3 run in the step's ``StepOrder``: on the calling thread, after every bucket's stage
1, in bucket order, so every rank issues its collectives in the same order; the decompression
of stage 3 runs in the all-gather's callback.
"""

import torch

from .. import codec, ops
from .. import payload as wire
from . import collectives
from .futures import after, new_future
from .threshold_rule import Kept


def write_empty(buffer: torch.Tensor, numel: int, capacity: int,
                value_dtype: torch.dtype, index_encoding: str = "int32",
                num_scales: int = 0) -> None:
    """An empty payload (count 0) of ``capacity`` slots for a tensor of ``numel`` elements."""
    buffer.copy_(wire.new_payload(numel, capacity, value_dtype, (numel,), torch.float32,
                                  buffer.device, index_encoding, num_scales).buffer)


def padded(bounds, length: int, total: int):
    """Scale-segment offsets padded to ``length`` entries with ``total`` (empty segments), so
    that every row of an exchange has the same size."""
    return list(bounds) + [total] * (length - len(bounds))


def row_counts(rows: torch.Tensor):
    """(count int32 [W], overflow int32 [W]) views of wire rows' headers (either version)."""
    words = rows[:, :wire.HEADER_BYTES].view(torch.int32)
    return words[:, wire.WORD_COUNT], words[:, wire.WORD_OVERFLOW]


class ReduceScatterExchange:
    """Sized once from a bucket layout (its ``shard``); ``start`` once per sparse step.

    ``start(buffer, order, refresh_due)`` runs stage 1 and issues the all-to-all, and queues
    stages 2 and 3 in ``order`` (run on the calling thread at the step's last bucket); it
    returns (future of the bucket's average, send rows). ``refresh_due()`` says whether τ' must
    be recomputed this step (schedule or a pending flag).
    """

    name = "reduce_scatter"

    def __init__(self, layout, *, group, value_dtype, backend, validate, errors, on_shard):
        self.layout = layout
        self.shard = layout.shard
        self.group = group
        self.value_dtype = value_dtype
        self.backend = backend
        self.validate = validate
        self.errors = errors
        self.on_shard = on_shard  # (stage-2 payload, refreshed) -> None: statistics, flags
        world = layout.world
        self.capacity = self.shard.capacity
        row = layout.plan.shard_row_bytes
        device = layout.device
        self.send = torch.zeros(world, row, dtype=torch.uint8, device=device)
        self.recv = torch.zeros(world, row, dtype=torch.uint8, device=device)
        self.own = torch.zeros(row, dtype=torch.uint8, device=device)
        self.gathered = torch.zeros(world, row, dtype=torch.uint8, device=device)
        self.sum = torch.zeros(self.shard.numel, dtype=torch.float32, device=device)
        self.index_encoding = layout.index_encoding
        self.num_scales = layout.plan.shard_scales
        self.version = wire.version_of(value_dtype, self.index_encoding)
        self.row_layout = wire.wire_layout(self.capacity, value_dtype, self.index_encoding,
                                           self.num_scales)
        cuts, numel = layout.plan.cuts, layout.numel
        # Version 2 with fp8: every row's scale segments, padded to one count. Stage-1 rows
        # describe their shard; stage-2 payloads the whole bucket (positions from the shard's
        # start, so no rebase).
        fp8 = value_dtype == wire.FLOAT8
        self.stage1_scales = [
            padded(segments.offsets if segments is not None else [0], self.num_scales + 1,
                   cuts[s + 1] - cuts[s])
            for s, segments in enumerate(self.shard.all_segments)] if fp8 else None
        own = self.shard.segments
        self.stage2_scales = padded(
            [0] + [self.shard.start + o for o in own.offsets] + [numel],
            self.num_scales + 1, numel) if fp8 and own is not None else None
        bounds = self.shard.piece_bounds
        # The stage-1 row of every piece (for the band's "row overflowed" mask).
        self.piece_rows = torch.tensor([s for s in range(world)
                                        for _ in range(bounds[s + 1] - bounds[s])],
                                       dtype=torch.int64).to(device)

    def traffic(self):
        """(sent, received) bytes per rank of one step (without the dense part)."""
        w, r = self.layout.world, self.send.shape[1]
        return (w - 1) * r + r, 2 * (w - 1) * r

    def stage1(self, buffer: torch.Tensor) -> None:
        """Compress the bucket shard by shard into the rows of ``send`` (no sync)."""
        layout, shard = self.layout, self.shard
        ops.compress_shards(buffer, shard.stage1_thresholds, cuts=layout.plan.cuts,
                            segments=shard.all_segments, capacity=self.capacity,
                            residual=layout.residual, value_dtype=self.value_dtype,
                            index_encoding=self.index_encoding,
                            scale_offsets=self.stage1_scales, out=self.send,
                            backend=self.backend)

    def stage2(self, refresh: bool) -> None:
        """Sum this rank's shard over the ranks, add the shard residual, threshold at τ'
        (recomputed first when ``refresh``), into ``own`` in bucket positions."""
        layout, shard = self.layout, self.shard
        if shard.segments is None:
            write_empty(self.own, layout.numel, self.capacity, self.value_dtype,
                        self.index_encoding, self.num_scales)
            return
        ops.decompress_many(self.recv, out=self.sum, validate=self.validate,
                            capacity=self.capacity, value_dtype=self.value_dtype,
                            index_encoding=self.index_encoding,
                            num_scales=self.num_scales or None, errors=self.errors,
                            backend=self.backend)
        if refresh:
            acc = self.sum + shard.residual
            shard.rule.refresh(shard.thresholds,
                               ops.select_threshold(acc, shard.ks, segments=shard.segments,
                                                    backend=self.backend))
        else:
            shard.rule.estimate(shard.thresholds, self.sum, shard.residual, self.backend)
        payload = ops.compress(self.sum, shard.thresholds, segments=shard.segments,
                               residual=shard.residual, capacity=self.capacity,
                               value_dtype=self.value_dtype,
                               index_encoding=self.index_encoding,
                               position_offset=shard.start, total_numel=layout.numel,
                               scale_offsets=self.stage2_scales, out=self.own,
                               backend=self.backend)
        self.on_shard(payload, refresh)

    def start(self, buffer: torch.Tensor, order, refresh_due):
        """Stage 1 on ``buffer`` now (the shards compressed into W rows, the all-to-all
        issued); stages 2 and 3 queued on ``order`` (the step's issue order: run at the
        step's last bucket, in bucket order). ``refresh_due()`` says, when stage 2 runs,
        whether its τ' are recomputed exactly. Returns (future of the bucket's average,
        this rank's stage-1 rows)."""
        device, layout = buffer.device, self.layout
        self.stage1(buffer)
        exchanged = collectives.all_to_all_rows_async(self.send, self.recv, self.group)
        result = new_future(device)

        def issue_stage3():
            refused = None
            try:
                exchanged.wait()
                try:
                    self.stage2(refresh_due())
                except Exception as error:
                    # Only this rank saw what stage 2 refused (a bad row it received, with
                    # validate=True). The others still gather from it: skipping the
                    # collective would pair their next one with this rank's, mixing buckets
                    # and leaving the last one waiting. So it sends an empty row, and fails
                    # once the collective is done.
                    refused = error
                    write_empty(self.own, layout.numel, self.capacity, self.value_dtype,
                                self.index_encoding, self.num_scales)
                gathered = collectives.all_gather_rows_async(self.own, self.group,
                                                             out=self.gathered)[1]
            except Exception as error:
                result.set_exception(refused if refused is not None else error)
                return
            if refused is not None:
                def fail():
                    raise refused
                after([gathered], fail, device, into=result)
                return

            def average():
                ops.decompress_many(self.gathered, out=buffer, average=True,
                                    validate=self.validate, capacity=self.capacity,
                                    value_dtype=self.value_dtype,
                                    index_encoding=self.index_encoding,
                                    num_scales=self.num_scales or None, errors=self.errors,
                                    backend=self.backend)
                return buffer

            after([gathered], average, device, into=result)

        order.chain(issue_stage3, result)
        return result, self.send

    def capped_segments(self, overflow: torch.Tensor) -> torch.Tensor:
        """bool [S]: parameters with a piece in a stage-1 row that overflowed."""
        shard = self.shard
        rows = self.piece_rows
        capped = torch.zeros(self.layout.num_segments, dtype=torch.int64,
                             device=overflow.device)
        capped.index_add_(0, shard.piece_param, (overflow > 0)[rows].to(torch.int64))
        return capped > 0

    def stage1_kept(self):
        """(Kept, count [W], overflow [W]) of the rows this rank sent in stage 1: where their
        entries are in the bucket, and each row's entry count and overflow."""
        count, overflow = row_counts(self.send)
        if self.version == 2:
            local, valid = codec.row_positions(self.send, self.row_layout)
            positions = local + self.shard.cut_starts[:, None]
            return Kept.of_positions(positions, valid), valid.sum(dim=1), overflow
        return Kept.of_rows(self.send, self.capacity, self.shard.cut_starts), count, overflow
