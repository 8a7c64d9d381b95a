"""A tiny Pix2Seq trained on two synthetic images must find their boxes through the pipeline."""

import numpy as np
import PIL.Image
import torch
from testing_utils import tiny_config
from torchvision.ops import box_iou
from transformers import pipeline

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


OBJECTS = [
    # (height, width), [(x_min, y_min, x_max, y_max, class), ...] in pixels
    ((48, 64), [(4, 6, 28, 30, 0), (36, 20, 60, 44, 1)]),
    ((64, 40), [(6, 30, 34, 60, 2)]),
]
COLORS = {0: (255, 40, 40), 1: (40, 255, 40), 2: (40, 40, 255)}


def draw(size, objects):
    image = np.full((*size, 3), 30, dtype=np.uint8)
    for x_min, y_min, x_max, y_max, label in objects:
        image[y_min:y_max, x_min:x_max] = COLORS[label]
    return PIL.Image.fromarray(image)


def test_tiny_model_overfits_two_images_and_the_pipeline_finds_their_boxes(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(
        d_model=64, decoder_ffn_dim=128, encoder_ffn_dim=128, max_instances=3, dropout=0.0, drop_path_rate=0.0
    )
    model = Pix2SeqForObjectDetection(config)
    processor = Pix2SeqImageProcessor.from_model_config(config)
    images = [draw(size, objects) for size, objects in OBJECTS]
    annotations = [
        {
            "image_id": i,
            "annotations": [{"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": c} for x0, y0, x1, y1, c in objects],
        }
        for i, (_, objects) in enumerate(OBJECTS)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model.train()
    for _ in range(300):
        # The DETR way: the processor's targets are what the model trains on (fresh augmented sequences every step).
        inputs = processor(images, annotations=annotations, do_sequence_augmentation=True, return_tensors="pt")
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path), trust_remote_code=True)
    for image, (_, objects) in zip(images, OBJECTS):
        detections = detector(image, threshold=0.5)
        for x_min, y_min, x_max, y_max, label in objects:
            name = config.id2label[label]
            found = [d["box"] for d in detections if d["label"] == name]
            assert found, f"no {name} found in {detections}"
            boxes = torch.tensor([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in found], dtype=torch.float32)
            iou = box_iou(boxes, torch.tensor([[x_min, y_min, x_max, y_max]], dtype=torch.float32)).max()
            assert iou > 0.8, (name, found, iou)
