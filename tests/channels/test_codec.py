"""Property tests: every value the codec accepts comes back equal (bytes and ring)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from headrace.channels import codec
from headrace.channels.shm import ShmChannel

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text() | st.binary())
nested = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=5) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=5)),
    max_leaves=20)
dtypes = (hnp.integer_dtypes() | hnp.unsigned_integer_dtypes() | hnp.floating_dtypes()
          | hnp.complex_number_dtypes() | hnp.boolean_dtypes() | hnp.datetime64_dtypes()
          | hnp.timedelta64_dtypes()
          | hnp.byte_string_dtypes(max_len=8) | hnp.unicode_string_dtypes(max_len=8))
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(max_dims=3, max_side=40)))


def through_bytes(value: Any) -> Any:
    enc = codec.encode(value)
    header = enc.header_bytes()
    tag, aux, size, scalar = codec.read_header(header)
    assert size == enc.size
    return codec.decode(tag, aux, scalar, enc.payload_bytes())


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@given(nested)
def test_nested_python_values_round_trip(value: Any) -> None:
    assert same(through_bytes(value), value)


@given(arrays)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_numpy_arrays_of_every_dtype_round_trip(arr: np.ndarray) -> None:
    got = through_bytes(arr)
    assert got.dtype == arr.dtype and got.shape == arr.shape    # byte order kept too
    np.testing.assert_array_equal(got, arr)
    # a contiguous array of a plain dtype skips pickle: its dtype, shape and bytes travel
    assert (codec.encode(arr).tag == codec.T_NDARRAY) == (
        arr.flags.c_contiguous and arr.dtype.fields is None and arr.dtype.kind != "O")


@given(arrays.filter(lambda a: a.ndim > 1))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_fortran_ordered_and_sliced_arrays_round_trip(arr: np.ndarray) -> None:
    for variant in (np.asfortranarray(arr), arr[::2], arr.T):
        np.testing.assert_array_equal(through_bytes(variant), variant)


tables = st.lists(st.tuples(st.integers(-2 ** 63, 2 ** 63 - 1) | st.none(),
                            st.floats(allow_nan=False) | st.none(), st.text() | st.none()),
                  max_size=30).map(
    lambda rows: pa.table({"i": pa.array([r[0] for r in rows], pa.int64()),
                           "f": pa.array([r[1] for r in rows], pa.float64()),
                           "s": pa.array([r[2] for r in rows], pa.string())}))


@given(tables)
def test_arrow_tables_batches_and_arrays_round_trip(table: pa.Table) -> None:
    assert through_bytes(table).equals(table)
    batch = table.combine_chunks().to_batches()
    if batch:
        assert through_bytes(batch[0]).equals(batch[0])
    assert through_bytes(table.column("s").combine_chunks()).equals(
        table.column("s").combine_chunks())


@pytest.fixture(scope="module")
def ring() -> ShmChannel:
    ch = ShmChannel(capacity=2, slot_bytes=64 * 1024)
    yield ch
    ch.close()


@given(nested | arrays)
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          max_examples=60)
def test_values_round_trip_through_a_ring(ring: ShmChannel, value: Any) -> None:
    w, r = ring.writer(), ring.reader(0)
    w.write(value, timeout_s=1)
    got = r.read(timeout_s=1)
    if isinstance(value, np.ndarray):
        np.testing.assert_array_equal(got, value)
    else:
        assert same(got, value)


def test_an_unpicklable_value_names_its_type() -> None:
    with pytest.raises(TypeError, match="cannot write a value of type generator to a channel"):
        codec.encode(x for x in ())
