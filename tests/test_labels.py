import pytest

from emotion.labels import LABELS, canonical_label


def test_order_is_the_class_id():
    assert LABELS == ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        ("anger", "angry"),
        ("Angry", "angry"),
        ("disgusted", "disgust"),
        ("FEARFUL", "fear"),
        ("happiness", "happy"),
        ("Neutral", "neutral"),
        ("sadness", "sad"),
        ("surprised", "surprise"),
        (" Surprise ", "surprise"),
    ],
)
def test_public_dataset_folder_names(folder, label):
    assert canonical_label(folder) == label
    assert label in LABELS


@pytest.mark.parametrize("folder", ["contempt", "Contempt", "other", "", "happy2"])
def test_unknown_names_are_never_mapped(folder):
    assert canonical_label(folder) is None
