"""The data contract between `pipelines.build_tfrecords` and every reader of its records.

One place in code for the record format and `metadata.json`; the writer (the
Beam pipeline) and the readers (the input stream, verification, evaluation)
import it and nothing of each other, so the two sides cannot drift apart.
`README.md` beside this file is the same contract for people.

- `schema`: feature keys, the `tf.train.Example` of one image, shard names.
- `framing`: the TFRecord framing, written and read without TensorFlow.
- `metadata`: `metadata.json` as typed objects.
- `classes`: class identity and the same-classes check.
- `integrity`: shard sizes and digests, damage found and named.
- `folder`: `Records`, a records folder opened and checked once.
- `fileio`: local paths and URLs alike; atomic JSON writes; the kernel's file lock.
- `checked_json`: typed JSON reads that name the bad field.
"""
