"""The exact-merge record of a LoRA module (``LoRALinear``, ``LoRAEmbedding``) under ``copy.deepcopy`` and in state
dicts: a mixin for modules that keep ``self.merged`` and ``self._merge_record`` (a ``MergeRecord`` made on
``self._record_weight()``)."""

from __future__ import annotations

import copy
import warnings

from ._checks import LoRAInputError


class MergeRecordState:
    """``__deepcopy__`` (the copy's record re-bound to the copy's weight) and ``lora_merge_record`` in state dicts."""

    def _record_weight(self):
        """The tensor the merge record describes: ``weight_nk`` (LoRALinear: W or Conv1D's transposed view),
        ``_weight_t()`` (LoRAEmbedding: the table's [D, V] view), else ``weight``."""
        if hasattr(self, "weight_nk"):
            return self.weight_nk
        if hasattr(self, "_weight_t"):
            return self._weight_t()
        return self.weight

    # -- the merge record under copy.deepcopy --------------------------------------------------------------------
    def __deepcopy__(self, memo):
        """A deep copy as ``nn.Module``'s default (every attribute deep-copied through ``memo``), then the copy's exact
        merge record is re-bound to the copy's weight (``exact_merge.rebind_record_``), so ``unmerge()`` on a copy
        of a merged layer restores the copy's base weight bit-for-bit, and the original keeps its own record."""
        cls = type(self)
        new = object.__new__(cls)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        rec = new.__dict__.get("_merge_record")
        if rec is not None and self.merged:
            from .exact_merge import rebind_record_

            old_w = self._record_weight()
            new_w = new._record_weight()
            rebind_record_(rec, old_w, new_w)
        return new

    # -- the merge record in a state dict -------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A merged layer's state dict also holds its exact-merge record, serialised as one uint8 tensor
        ``lora_merge_record`` (``exact_merge.record_to_tensor``), so that loading it (next to the merged ``weight``)
        gives a merged layer that unmerges bit for bit. An unmerged layer's keys are unchanged."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.merged:
            return
        from .exact_merge import _check_record, record_to_tensor

        rec = self.__dict__.get("_merge_record")
        try:
            _check_record("state_dict", self._record_weight(), rec, None)
            destination[prefix + "lora_merge_record"] = record_to_tensor(rec)
        except LoRAInputError as e:
            warnings.warn(
                f"{type(self).__name__}.state_dict(): the layer is merged ('weight' holds W0 + ΔW) but its merge record cannot be "
                f"saved ({e}). Loading this state dict into an unmerged LoRALinear applies the adapter twice; export "
                "with lora_kernels.merge_and_unload(model), or unmerge() before saving to keep W0.", UserWarning,
                stacklevel=3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loading a ``weight`` sets the layer merged (with the saved record, re-bound to this weight) when the state
        dict came from a merged layer, and unmerged otherwise (the loaded weight is then W0)."""
        rec_t = state_dict.pop(prefix + "lora_merge_record", None)
        has_w = (prefix + "weight") in state_dict
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not has_w or len(error_msgs) > n_err:
            return
        if rec_t is None:
            if self.merged:  # the weight just loaded is an unmerged one
                self.__dict__["_merge_record"] = None
                self.merged = False
                if hasattr(self, "merged_adapters"):
                    self.merged_adapters = ()
            return
        from .exact_merge import record_from_tensor

        try:
            rec = record_from_tensor(rec_t, self._record_weight())
        except LoRAInputError as e:
            error_msgs.append(f"{prefix}lora_merge_record: {e}")
            return
        self.__dict__["_merge_record"] = rec
        self.merged = True
        if hasattr(self, "active_adapters"):
            self.merged_adapters = self.active_adapters
