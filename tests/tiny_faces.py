"""Tiny ONNX face models with the input/output names and shapes of insightface's buffalo_l pack.

- a "detector" (SCRFD, 9 outputs: strides 8, 16, 32, two anchors per cell, keypoints) that fires
  where the image is red: the score of a stride-8 cell is relu of its mean normalised red channel,
  the other strides never fire, and every box and keypoint offset is the constant BOX_DIST /
  KPS_OFFSETS, so decoding and NMS must recover a box and keypoints computable by hand. Its input
  size is free, so it runs at any `det_size` (a multiple of 32), insightface's 640 included;
- an "ArcFace" that is a fixed linear map (ARCFACE_WEIGHT) of the 16×16-pooled normalised 112² crop;
- a "landmark" net (106 points) with the constant output LANDMARK_RAW.

`build_face_models()` makes the three graphs; `write_face_pack()` saves them as a model pack that
`minid.faces.analyzer.FaceAnalyzer.from_pack` (and so `minid eval`) loads. The fixtures
`onnx_models` and `tiny_face_pack` in conftest.py wrap them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DET_SIZE = 64  # the detector input side the test_faces checks use
BOX_DIST = np.array([1.5, 2.0, 1.5, 2.5])  # left, top, right, bottom distances in strides
# 5 points, in strides
KPS_OFFSETS = np.array([-0.5, -0.5, 0.5, -0.5, 0.0, 0.25, -0.4, 1.0, 0.4, 1.0])
# constant landmark output, crop units [−1, 1]
LANDMARK_RAW = np.linspace(-0.9, 0.9, 212).reshape(106, 2)
# (3·7·7, 512)
ARCFACE_WEIGHT = np.random.default_rng(0).standard_normal((147, 512)).astype(np.float32)
PACK = "tiny_pack"


def build_face_models() -> dict:
    """{"detector", "arcface", "landmark"}: onnx.ModelProto each; "arcface_weight":
    ARCFACE_WEIGHT."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def model(nodes, inputs, outputs, inits):
        graph = helper.make_graph(
            nodes,
            "tiny",
            inputs,
            outputs,
            [numpy_helper.from_array(v, k) for k, v in inits.items()],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m

    def node(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    # Detector. Per stride s: one value per cell (a pooled map of the red channel), repeated for the
    # two anchors of a cell (adjacent in the output), as a column (K_s, 1); zeros of that shape
    # broadcast against the constant box and keypoint rows give (K_s, 4) and (K_s, 10) for any input
    # size.
    nodes = [node("Slice", ["input.1", "c0", "c1", "ax1"], "red")]
    for s in (8, 16, 32):
        nodes += [
            node("AveragePool", ["red"], f"pool_{s}", kernel_shape=[s, s], strides=[s, s]),
            node("Reshape", [f"pool_{s}", "col"], f"cells_{s}"),
            node("Concat", [f"cells_{s}", f"cells_{s}"], f"anchors_{s}", axis=1),
            node("Reshape", [f"anchors_{s}", "col"], f"column_{s}"),
            node("Mul", [f"column_{s}", "zero"], f"zeros_{s}"),
            node("Add", [f"zeros_{s}", "box_dist"], f"bbox_{s}"),
            node("Add", [f"zeros_{s}", "kps_offsets"], f"kps_{s}"),
        ]
    nodes += [
        node("Relu", ["column_8"], "score_8"),
        node("Identity", ["zeros_16"], "score_16"),
        node("Identity", ["zeros_32"], "score_32"),
    ]
    widths = {"score": 1, "bbox": 4, "kps": 10}
    outputs = [
        helper.make_tensor_value_info(f"{k}_{s}", TensorProto.FLOAT, [f"K{s}", w])
        for k, w in widths.items()
        for s in (8, 16, 32)
    ]
    detector = model(
        nodes,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
        outputs,
        {
            "c0": np.array([0]),
            "c1": np.array([1]),
            "ax1": np.array([1]),
            "col": np.array([-1, 1]),
            "zero": np.zeros(1, np.float32),
            "box_dist": BOX_DIST[None].astype(np.float32),
            "kps_offsets": KPS_OFFSETS[None].astype(np.float32),
        },
    )

    # ArcFace: 16×16 average pool → flatten (3·7·7 = 147) → fixed linear map to 512.
    arcface = model(
        [
            helper.make_node(
                "AveragePool",
                ["input.1"],
                ["p"],
                name="pool",
                kernel_shape=[16, 16],
                strides=[16, 16],
            ),
            helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
            helper.make_node("MatMul", ["f", "w"], ["683"], name="fc"),
        ],
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])],
        {"w": ARCFACE_WEIGHT},
    )

    # Landmark: a constant prediction (through a zero weight, so the batch axis is the input's).
    landmark = model(
        [
            # MXNet-style in-graph
            helper.make_node("Sub", ["data", "zero_mean"], ["centred"], name="Sub_0"),
            # normalisation: mean 0, std 1
            helper.make_node("Mul", ["centred", "one"], ["scaled"], name="Mul_1"),
            helper.make_node("GlobalAveragePool", ["scaled"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["gf"], name="flatten", axis=1),
            helper.make_node("MatMul", ["gf", "wz"], ["m"], name="fc"),
            helper.make_node("Add", ["m", "bias"], ["fc1"], name="bias"),
        ],
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 212])],
        {
            "zero_mean": np.zeros(1, np.float32),
            "one": np.ones(1, np.float32),
            "wz": np.zeros((3, 212), np.float32),
            "bias": LANDMARK_RAW.reshape(-1).astype(np.float32),
        },
    )
    return {
        "detector": detector,
        "arcface": arcface,
        "landmark": landmark,
        "arcface_weight": ARCFACE_WEIGHT,
    }


def write_face_pack(models: dict, root: Path, pack: str = PACK) -> Path:
    """Save the models as `root/models/<pack>/{det,rec,lmk}.onnx` (insightface's layout); returns
    the pack folder."""
    import onnx

    folder = Path(root) / "models" / pack
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(models["detector"], str(folder / "det.onnx"))
    onnx.save(models["arcface"], str(folder / "rec.onnx"))
    onnx.save(models["landmark"], str(folder / "lmk.onnx"))
    return folder


def red_squares(height: int, width: int, squares) -> np.ndarray:
    """A black uint8 RGB image (height, width, 3) with a red square at each (x, y, side): a face to
    the detector."""
    image = np.zeros((height, width, 3), np.uint8)
    for x, y, side in squares:
        image[y : y + side, x : x + side, 0] = 255
    return image
