"""Reading raw frames from compiled code: ``pread`` called from numba, so that each counting thread
reads a frame into its own scratch and counts it while the frame is still in its cache.

Reading from Python (``os.preadv`` into a batch buffer, in a reader thread) and counting in other
threads moves every frame through main memory twice and keeps one core busy copying; reading inside
the numba threads needs no hand-over, no GIL and no batch buffer (measured on 2 cores: ~2x the
frames/s of the reader-thread pipeline).

``pread`` is declared by name in the generated code (resolved from the C library when the code is
loaded), not bound as a ctypes pointer, so the functions stay cacheable. numba's cache checks only
the file of each cached function: after editing this file, delete the ``__pycache__`` folders of
counting/ (the callers there keep their compiled copy of read_frame otherwise).
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from stemstream.core.detector import HEADER_BYTES, HEADER_DTYPE, N_MODULES, RECORD_BYTES, SECTOR_BYTES, SECTOR_ROWS


@intrinsic
def _pread(typingctx, fd, array, byte_offset, nbytes, file_offset):
    """``pread(fd, array's data + byte_offset, nbytes, file_offset)``: bytes read, 0 at the end of
    the file, -1 on error. The caller keeps ``byte_offset + nbytes`` within the array."""
    if not isinstance(array, types.Array):
        return None
    sig = types.int64(types.int64, array, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fd_v, array_v, byte_offset_v, nbytes_v, file_offset_v = args
        data = context.make_array(signature.args[1])(context, builder, array_v).data
        i8p = ir.IntType(8).as_pointer()
        i64 = ir.IntType(64)
        ptr = builder.gep(builder.bitcast(data, i8p), [byte_offset_v])
        fnty = ir.FunctionType(i64, [ir.IntType(32), i8p, i64, i64])  # ssize_t (int, void *, size_t, off_t)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "pread")
        return builder.call(fn, [builder.trunc(fd_v, ir.IntType(32)), ptr, nbytes_v, file_offset_v])

    return sig, codegen


@intrinsic
def fetch_add(typingctx, array, index, value):
    """Atomically add ``value`` to ``array[index]`` (a C-contiguous int64 array) and return the old
    value: a shared work counter, so that numba threads take frames as they become free instead of
    a fixed share each (on a shared machine one of them is often descheduled for a while)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    sig = types.int64(array, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        array_v, index_v, value_v = args
        ary = context.make_array(signature.args[0])(context, builder, array_v)
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [index_v])
        return builder.atomic_rmw("add", ptr, value_v, "seq_cst")

    return sig, codegen


@njit(nogil=True, cache=True)
def pread_into(fd, array, byte_offset, nbytes, file_offset):
    """Read exactly ``nbytes`` (a short read is retried); False on an error or the end of the file."""
    done = 0
    while done < nbytes:
        got = _pread(fd, array, byte_offset + done, nbytes - done, file_offset + done)
        if got <= 0:
            return False
        done += got
    return True


@njit(nogil=True, cache=True)
def read_frame(fds, source_file, source_record, f, out):
    """Read frame ``f`` of a FrameTable (``source_file`` / ``source_record`` rows, ``fds`` the
    scan's open files by file index) into ``out``, a C-contiguous FRAME_SHAPE uint16 array; a
    missing sector (file index -1) is zero-filled. Returns -1, or the module whose read failed."""
    for m in range(N_MODULES):
        sector = out[m * SECTOR_ROWS : (m + 1) * SECTOR_ROWS]
        fi = source_file[f, m]
        if fi < 0:
            sector[:] = 0
            continue
        if not pread_into(fds[fi], sector, 0, SECTOR_BYTES, source_record[f, m] * RECORD_BYTES + HEADER_BYTES):
            return m
    return -1


@njit(nogil=True, parallel=True, cache=True)
def _read_headers(fds, first, n_records, out, failed):
    # Files spread over the threads; out rows first[f] .. first[f] + n_records[f] - 1 are file f's
    # headers (HEADER_BYTES each). failed[f]: the first record whose header could not be read, or -1.
    for f in prange(fds.shape[0]):
        failed[f] = -1
        for i in range(n_records[f]):
            if not pread_into(fds[f], out[first[f] + i], 0, HEADER_BYTES, i * RECORD_BYTES):
                failed[f] = i
                break


def read_headers(paths, n_records) -> list[np.ndarray]:
    """The headers of the first ``n_records[f]`` records of each raw file ``paths[f]``, as
    HEADER_DTYPE arrays: one HEADER_BYTES ``pread`` per record from compiled code, files spread
    over the threads (~1 us a record, where reading them through a memory map faults in a page per
    record, ~5 us). For one file: ``read_headers([path], [n])[0]``. Raises OSError naming the file
    that cannot be read, or that ends before its ``n_records[f]``-th record."""
    counts = np.asarray(n_records, np.int64)
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    out = np.empty((int(counts.sum()), HEADER_BYTES), np.uint8)
    failed = np.full(len(paths), -1, np.int64)
    fds = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, os.O_RDONLY))
            except OSError as exc:
                raise OSError(exc.errno, f"{path}: cannot open ({exc.strerror})") from exc
        if len(out):
            _read_headers(np.array(fds, np.int64), first, counts, out, failed)
        for f in np.flatnonzero(failed >= 0):
            offset = int(failed[f]) * RECORD_BYTES
            try:
                data = os.pread(fds[f], HEADER_BYTES, offset)
            except OSError as exc:
                raise OSError(exc.errno, f"{paths[f]}: cannot read at byte offset {offset} ({exc.strerror})") from exc
            raise OSError(f"{paths[f]} ended at byte offset {offset + len(data)} inside a record header (was it truncated?)")
    finally:
        for fd in fds:
            os.close(fd)
    headers = out.view(HEADER_DTYPE).reshape(-1)
    return [headers[a : a + n] for a, n in zip(first, counts)]


def raise_read_error(paths, fds: np.ndarray, source_file: np.ndarray, source_record: np.ndarray, f: int, module: int):
    """Turn a failed compiled read into the OSError that Python's own read gives (with errno and the
    file name), or a short-read error when the file ends early (it was truncated meanwhile)."""
    fi = int(source_file[f, module])
    offset = int(source_record[f, module]) * RECORD_BYTES + HEADER_BYTES
    path = paths[fi]
    try:
        data = os.pread(int(fds[fi]), SECTOR_BYTES, offset)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read {path} at byte offset {offset}: {exc.strerror}") from exc
    raise OSError(f"{path} ended at byte offset {offset + len(data)} inside a sector record (was it truncated?)")
