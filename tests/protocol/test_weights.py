"""The packed-bucket layout both sides of a weight group compute, and tensor specs."""

import pytest

from protocol.weights import BucketPiece, TensorSpec, bucket_layout, bucket_sizes, tensor_specs, whole_tensor_layout


def test_buckets_cut_the_concatenated_bytes_every_bucket_bytes():
    specs = [TensorSpec("a", "float32", (3,)), TensorSpec("b", "bfloat16", (5,)), TensorSpec("c", "float32", ())]
    layout = bucket_layout(specs, 8)  # 12 + 10 + 4 = 26 bytes
    assert bucket_sizes(layout) == [8, 8, 8, 2]
    assert layout[0] == [BucketPiece(0, 0, 0, 8)]
    assert layout[1] == [BucketPiece(0, 8, 0, 4), BucketPiece(1, 0, 4, 4)]
    assert layout[2] == [BucketPiece(1, 4, 0, 6), BucketPiece(2, 0, 6, 2)]
    assert layout[3] == [BucketPiece(2, 2, 0, 2)]
    assert bucket_sizes(bucket_layout(specs, 1000)) == [26]


def test_vllms_buckets_hold_whole_tensors_and_close_once_past_bucket_bytes():
    specs = [TensorSpec("a", "float32", (3,)), TensorSpec("b", "bfloat16", (5,)), TensorSpec("c", "float32", ())]
    layout = whole_tensor_layout(specs, 8)  # 12 > 8: a alone; 10 > 8: b alone; c the rest
    assert layout == [[BucketPiece(0, 0, 0, 12)], [BucketPiece(1, 0, 0, 10)], [BucketPiece(2, 0, 0, 4)]]
    assert whole_tensor_layout(specs, 22) == [[BucketPiece(0, 0, 0, 12), BucketPiece(1, 0, 12, 10),
                                               BucketPiece(2, 0, 22, 4)]]  # fmt: skip
    assert bucket_sizes(whole_tensor_layout(specs, 21)) == [22, 4]


def test_a_tensor_without_bytes_takes_no_room():
    specs = [TensorSpec("empty", "float32", (0, 4)), TensorSpec("x", "float16", (2,))]
    assert bucket_layout(specs, 64) == [[BucketPiece(1, 0, 0, 4)]]
    assert whole_tensor_layout(specs, 64) == [[BucketPiece(1, 0, 0, 4)]]


def test_specs_name_what_is_wrong():
    assert tensor_specs(["w"], ["torch.bfloat16"], [[2, 3]]) == [TensorSpec("w", "bfloat16", (2, 3))]
    assert tensor_specs(["w"], ["bfloat16"], [[2, 3]])[0].nbytes == 12
    with pytest.raises(ValueError, match="tensor 'w': dtype 'float8_e4m3fn' is not accepted"):
        tensor_specs(["w"], ["float8_e4m3fn"], [[1]])
    with pytest.raises(ValueError, match="negative size"):
        tensor_specs(["w"], ["float32"], [[-1]])
