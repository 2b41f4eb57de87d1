"""Where Ray Train and Ray Tune write run folders: S3 without directory markers.

Ray's ``RunConfig(storage_path=..., storage_filesystem=...)`` writes through a pyarrow
filesystem. Against an S3-compatible server (the embedded ``rclone serve s3``, MinIO), the
marker objects pyarrow adds for directories are refused; :func:`marker_free_filesystem`
gives Ray a filesystem without them, and leaves AWS S3 and local paths to Ray.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from vfx_ray import storage


class NoDirMarkers(pafs.FileSystemHandler):
    """S3 for Ray Train's checkpoint storage without directory marker objects.

    S3 has no directories; pyarrow still PUTs empty ``key/`` markers on create_dir and after
    deletes (to keep the parent "directory"), which the embedded ``rclone serve s3`` refuses
    and then lists the prefix wrongly. Ray Train only needs the objects: ``create_dir`` does
    nothing and deletes go through boto3 (no parent marker); the rest is passed through.

    Pickled (Ray Tune keeps it in ``tuner.pkl`` in the output folder, Train ships it to its
    workers) as "S3 of this bucket", never with the credentials pyarrow's filesystem would
    carry: the unpickling process builds its own from its environment.
    """

    def __init__(self, fs: pafs.FileSystem, bucket: str | None = None) -> None:
        self.fs = fs
        self.bucket = bucket

    @classmethod
    def for_bucket(cls, bucket: str | None) -> NoDirMarkers:
        return cls(storage.s3_filesystem(bucket), bucket)

    def __reduce__(self) -> tuple:
        return (NoDirMarkers.for_bucket, (self.bucket,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoDirMarkers) and self.fs.equals(other.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "vfx-s3-no-dir-markers"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        return None

    def delete_dir(self, path: str) -> None:
        storage.s3_delete(path, prefix=True)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        storage.s3_delete(path, prefix=True)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty the whole S3 account")

    def delete_file(self, path: str) -> None:
        storage.s3_delete(path, prefix=False)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return self.fs.open_append_stream(path, metadata=metadata)


def marker_free_filesystem(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) for libraries that write folders through pyarrow (Ray Train's and
    Tune's RunConfig storage). With a custom endpoint: a path in S3 without directory markers
    (S3-compatible servers may refuse them). On AWS S3 the URI itself and None, like a local
    path (made absolute): the library builds its own filesystem, the bucket's region resolved."""
    if storage.is_s3(uri) and storage.s3_endpoint():
        fs, path = storage.filesystem(uri)
        return path, pafs.PyFileSystem(NoDirMarkers(fs, storage.split_s3(uri)[0]))
    return (uri if storage.is_s3(uri) else os.path.abspath(uri)), None
