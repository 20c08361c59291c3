"""The objects a description names: Image Textualization's detector queries (Pi et al., 2024).

The paper asks an LLM to list the object entities of the reference description. We use a small
deterministic heuristic instead (no model, no download, the same answer every run): the
description is lower-cased and split into words, each word is singularized by a few English
rules, and every word or two-word phrase in an object vocabulary is an object, in order of first
mention; a two-word phrase ("traffic light") wins over its words. A noun outside the vocabulary
is neither checked nor removed. The vocabulary is ``recaption.textualize.object_words``.
"""

from __future__ import annotations

import re

# Countable things an open-vocabulary detector can box: COCO's 80 classes, then common objects of
# web photos. Stuff (sky, grass, water, road) is left out: a box neither proves nor disproves it.
_VOCABULARY = """
person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter
bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee
skis snowboard ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup
fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch
potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink
refrigerator book clock vase scissors teddy_bear hair_drier toothbrush
man woman child boy girl baby bike plane ship van taxi tractor scooter helmet hat cap shirt dress jacket coat
shoe boot sunglasses bag purse wallet watch phone computer monitor television camera lamp table desk sofa
pillow blanket window door curtain mirror shelf cabinet box basket plate mug jar pot pan candle flower tree
bush fence sign pole flag statue fountain tent house tower bridge castle church lighthouse guitar piano violin
drum microphone toy doll balloon duck chicken goose pigeon owl eagle parrot fish shark dolphin whale turtle
frog snake lizard butterfly bee spider rabbit squirrel deer fox wolf lion tiger monkey pig goat camel kangaroo
panda puppy kitten bread cheese egg tomato potato burger cookie pie sausage steak strawberry grape lemon pear
watermelon pineapple mushroom wheel tire
"""
DEFAULT_OBJECT_WORDS: tuple[str, ...] = tuple(dict.fromkeys(w.replace("_", " ") for w in _VOCABULARY.split()))

_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf",
              "wolves": "wolf", "shelves": "shelf", "loaves": "loaf", "skis": "skis", "glasses": "glasses",
              "sunglasses": "sunglasses", "scissors": "scissors", "bus": "bus", "buses": "bus", "sheep": "sheep",
              "fish": "fish", "deer": "deer", "dishes": "dish", "boxes": "box", "benches": "bench", "watches": "watch",
              "sandwiches": "sandwich", "couches": "couch", "churches": "church", "brushes": "brush",
              "toothbrushes": "toothbrush", "tomatoes": "tomato", "potatoes": "potato", "mangoes": "mango",
              "puppies": "puppy"}
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def singular(word: str) -> str:
    """A few English rules (irregular forms, -ies, -ches/-shes/-xes/-ses, -s); enough for nouns."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def extract_objects(text: str | None, words: tuple[str, ...] | list[str] = DEFAULT_OBJECT_WORDS) -> list[str]:
    """The vocabulary's objects that ``text`` names, singular, once each, in order of first mention."""
    vocab = {" ".join(singular(t) for t in w.lower().split()) for w in words}
    tokens = [singular(t) for t in _WORD.findall((text or "").lower())]
    found: list[str] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i:i + 2]) if i + 1 < len(tokens) else None
        if pair in vocab:
            hit, i = pair, i + 2
        else:
            hit, i = (tokens[i] if tokens[i] in vocab else None), i + 1
        if hit and hit not in found:
            found.append(hit)
    return found
