"""MERA meta-cognitive control: control segments, takeover data, CSPO.

    from metareason.plugins.cspo import control_mask
    mask = control_mask(input_ids, tokenizer)   # bool [B, T]: tokens of complete <control> segments

See docs/cspo.md. (Names load lazily: importing the plugin for the CLI does not import torch.)
"""
_PUBLIC = ("CONTROL_OPEN", "CONTROL_CLOSE", "CONTROL_TOKENS", "control_mask", "control_mask_from_ids",
           "parse_segments", "strip_segments")

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        from metareason.plugins.cspo import segments

        return getattr(segments, name)
    raise AttributeError(f"module 'metareason.plugins.cspo' has no attribute {name!r}")
