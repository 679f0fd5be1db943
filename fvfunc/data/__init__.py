"""Data: FastVideo's preprocessed parquet, read as is (one concept a module).

- `parquet`: a row's tensor cells decoded, rows written in FastVideo's schemas (as column sets:
  T2V, TEXT_ONLY, ODE_TRAJECTORY_TEXT_ONLY), atomic writes, the ids a folder holds;
- `dataset`: `ParquetDataset(paths, columns)`, random access to exactly the columns of a data spec;
- `order`: `epoch_order` (a seeded shuffle per epoch) and `Loader` (batches forever, resumable exactly).
"""

from fvfunc.data.dataset import ParquetDataset, columns_in, parse_specs
from fvfunc.data.order import SHUFFLES, Loader, epoch_order
from fvfunc.data.parquet import (
    ODE_TRAJECTORY_TEXT_ONLY,
    T2V,
    TEXT_ONLY,
    DataError,
    ids_in,
    schema,
    write_atomic,
    write_parquet,
)

__all__ = ["ODE_TRAJECTORY_TEXT_ONLY", "SHUFFLES", "T2V", "TEXT_ONLY", "DataError", "Loader", "ParquetDataset",
           "epoch_order", "columns_in", "ids_in", "parse_specs", "schema", "write_atomic", "write_parquet"]
