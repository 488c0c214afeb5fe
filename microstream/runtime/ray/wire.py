"""Rows between Ray processes as Arrow IPC bytes, not pickled Polars frames.

Ray pickles what a task or actor call takes and returns. A Polars ``DataFrame``
pickles through ``DataFrame.serialize``, which encodes every value (0.1 to 0.3 s to
write and 0.05 s to read 100k Nexmark bids on this project's busy 2-core test
machine); the same frame as uncompressed Arrow IPC (Polars' own string views,
``CompatLevel.newest()``) is written in about 0.02 s and read in 0.01 s, and bytes
pickle as a copy. (Arrow tables would pickle out of band, but Ray's own Arrow
serializer refuses string views, and the older Arrow types cost a conversion each
way.) So every frame that crosses a process boundary in RayRuntime travels as a
:class:`Wire`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import polars as pl

__all__ = ["Wire"]


@dataclass(frozen=True)
class Wire:
    """A frame as Arrow IPC bytes, with its Polars schema (a type Arrow spells
    otherwise comes back as it was).

    Examples
    --------
    >>> import pickle
    >>> frame = pl.DataFrame({"k": ["a", "b"], "e": pl.Series(["x", "y"], dtype=pl.Enum(["x", "y"]))})
    >>> back = pickle.loads(pickle.dumps(Wire.of(frame))).frame()
    >>> back.equals(frame), back.schema == frame.schema
    (True, True)
    """

    data: bytes
    schema: pl.Schema

    @classmethod
    def of(cls, frame: pl.DataFrame) -> Wire:
        buffer = io.BytesIO()
        frame.write_ipc(buffer, compression="uncompressed", compat_level=pl.CompatLevel.newest())
        return cls(buffer.getvalue(), frame.schema)

    def frame(self) -> pl.DataFrame:
        out = pl.read_ipc(self.data)
        if out.schema != self.schema:
            out = out.cast(self.schema)
        return out
