"""CIFAR-100's names and its fine-to-coarse table."""

from collections import Counter

from nam_keras.cifar100 import CIFAR100_COARSE_LABELS, CIFAR100_LABELS, FINE_TO_COARSE


def test_twenty_superclasses_of_five_classes_each():
    assert len(CIFAR100_COARSE_LABELS) == 20 and len(set(CIFAR100_LABELS)) == 100
    assert sorted(Counter(FINE_TO_COARSE).values()) == [5] * 20


def test_known_members_of_superclasses():
    """Spot checks against the CIFAR-100 page's superclass list."""
    members = {
        "fish": {"aquarium_fish", "flatfish", "ray", "shark", "trout"},
        "people": {"baby", "boy", "girl", "man", "woman"},
        "vehicles_2": {"lawn_mower", "rocket", "streetcar", "tank", "tractor"},
        "trees": {"maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"},
        "insects": {"bee", "beetle", "butterfly", "caterpillar", "cockroach"},
    }
    for coarse, fine in members.items():
        c = CIFAR100_COARSE_LABELS.index(coarse)
        assert {CIFAR100_LABELS[i] for i, k in enumerate(FINE_TO_COARSE) if k == c} == fine
