"""Embedded services, rank 1: the S3 object store (``rclone serve s3``) and the PACS (Debian's
Orthanc with DICOMweb) that the demo and the tests start on loopback, and that
``vfx-ray objectstore`` and ``vfx-ray pacs`` run.

May import the foundations only.
"""
