"""experiments/topic_control.py: the topic lists and classifier labels, and the script end to end on a
tiny character-level Backpack (the scoring maths and its cache are tests/test_steering.py's)."""

import json
import os

from test_steering import char_ckpt, script  # noqa: F401  (char_ckpt is a fixture; it puts experiments/ on sys.path)

import topic_control  # noqa: E402


def test_topic_lists_and_classifier_labels():
    topics = topic_control.read_topics("all")
    assert len(topics) == 17 and ("film_tv_video", ["film", "tv", "video"]) in topics
    assert topic_control.read_topics("sports") == [("sports", ["sports"])]
    assert topic_control.read_topics("love, war") == [("", ["love", "war"])]
    assert topic_control.read_topics("love;music") == [("", ["love"]), ("music", ["music"])]

    class Classifier:  # the part of a transformers pipeline classifier_label reads
        class model:
            class config:
                id2label = {0: "arts_&_culture", 1: "film_tv_&_video", 2: "sports"}
    assert topic_control.classifier_label(Classifier, "film_tv_video") == "film_tv_&_video"
    assert topic_control.classifier_label(Classifier, "") is None


def test_topic_control_script(char_ckpt):  # noqa: F811
    # offline: the classifier cannot download, which must be a one-line note, not a crash
    out = script("topic_control", f"--out_dir={char_ckpt}", "--topic_words=love,king", "--num_samples=5",
                 "--batch_size=3", "--max_new_tokens=8", "--strengths=0,3", env={"HF_HUB_OFFLINE": "1"})
    assert "semantic success:" in out and "| 0 | " in out and "| 3 | " in out
    res = json.load(open(os.path.join(char_ckpt, "experiments", "topic_control_love_king.json")))
    assert len(res["topics"]["love,king"]["0"]["samples"]) == 5 and res["multipliers"]["3"] == [3.3, 3.3, 3.0, 1.0]
    assert set(res["mean"]) == {"0", "3"}
    assert len(os.listdir(os.path.join(char_ckpt, "experiments", "topic_cache"))) == 2  # tops, the topic's scores
