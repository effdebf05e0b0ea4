"""pipelines: the Apache Beam build of ImageNet TFRecords, their verification, and the samples."""
