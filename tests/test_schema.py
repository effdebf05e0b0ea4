"""The record schema: the Example the build writes without TensorFlow is TensorFlow's, byte for byte."""

from tfrecords import schema


def test_make_example_matches_tensorflow_byte_for_byte_without_importing_it():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tfrecords import schema\n"
        "b = schema.make_example(jpeg=b'\\xff\\xd8jpeg', height=256, width=255, label=7, synset='n01440764',"
        " text='tench', filename='n01440764_1.JPEG')\n"
        "assert 'tensorflow' not in sys.modules\n"
        "sys.stdout.write(b.hex())\n"
    )
    ours = bytes.fromhex(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout)
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    theirs = tf.train.Example(features=tf.train.Features(feature={
        schema.ENCODED: b(b"\xff\xd8jpeg"), schema.FORMAT: b(b"JPEG"), schema.HEIGHT: i(256),
        schema.WIDTH: i(255), schema.CHANNELS: i(3), schema.COLORSPACE: b(b"RGB"), schema.LABEL: i(7),
        schema.SYNSET: b(b"n01440764"), schema.TEXT: b(b"tench"), schema.FILENAME: b(b"n01440764_1.JPEG"),
    })).SerializeToString(deterministic=True)
    assert ours == theirs
    parsed = schema.parse_example(ours)
    assert int(parsed[schema.WIDTH]) == 255 and parsed[schema.TEXT].numpy() == b"tench"


def test_shard_names_round_trip_and_refuse_what_is_not_one():
    assert schema.shard_name("validation", 7, 128) == "validation-00007-of-00128"
    assert schema.parse_shard_name("validation-00007-of-00128") == ("validation", 7, 128)
    for name in ("test-00000-of-00001", "train-00000-of-00001.tmp", "train-0000-of-00001", "x/train-00000-of-00001"):
        assert schema.parse_shard_name(name) is None
