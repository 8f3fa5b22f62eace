"""A few kilobytes of English written for this project (public domain), used to calibrate
MoE-fication: the FFN inputs the dense model produces on these texts decide how neurons are
grouped into experts and how the router scores them. Held-out evaluation text lives elsewhere
(tests/data/english_eval.txt) and shares no sentences with this.
"""

PARAGRAPHS = [
    "The harbour was busy long before sunrise. Fishermen carried crates of ice down the stone steps, "
    "gulls circled over the boats, and a woman sold hot tea from a cart beside the fish market. By "
    "seven o'clock most of the boats had left, and the water inside the wall was calm and grey.",

    "To grow tomatoes, choose a sunny corner that is sheltered from the wind. Plant the seedlings deep, "
    "water them at the base rather than over the leaves, and tie the stems to a cane as they grow. Pinch "
    "out the small side shoots every week, and pick the fruit as soon as it turns a deep, even red.",

    "The moon has no light of its own. It shines because it reflects sunlight, and the shape we see changes "
    "as the moon travels around the Earth once every twenty-nine days or so. When the moon lies between the "
    "Earth and the Sun, its bright side faces away from us and we call it a new moon.",

    "My grandmother kept every letter she ever received in a tin box under her bed. After she died we read "
    "them one winter evening: notes from school friends, postcards from a brother who worked on ships, and a "
    "long, nervous letter from the young man who later became my grandfather.",

    "A river carries sand, mud and small stones from the hills towards the sea. Where it slows down, near its "
    "mouth, it drops this load, and over thousands of years the deposits build a wide, flat delta. Deltas are "
    "often fertile, which is why so many farms and cities have grown up on them.",

    "Good software is written twice: once to make it work, and once to make it clear. The second version is "
    "shorter, easier to test and kinder to the next person who has to change it. Names should say what a "
    "thing is, functions should do one job, and every surprising line deserves a comment that explains why.",

    "In 1969 two astronauts walked on the surface of the moon while a third waited for them in orbit. The "
    "journey took about three days in each direction, and hundreds of millions of people watched the grainy "
    "pictures on television. The footprints they left behind are still there, because the moon has no wind.",

    "The orchestra tuned their instruments while the hall slowly filled. A single oboe played a long note, "
    "the violins answered, and then the cellos and basses joined in until the whole room hummed. When the "
    "conductor raised her arms, the noise stopped at once, and for a moment nobody seemed to breathe.",

    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature high in the "
    "mountains, where the air pressure is lower. That is why pasta takes longer to cook in a mountain hut, "
    "and why climbers carry pressure cookers to prepare their meals.",

    "The city of Rome is the capital of Italy, Madrid is the capital of Spain, and Berlin is the capital of "
    "Germany. Tokyo, the capital of Japan, is one of the largest cities in the world, while Canberra, the "
    "capital of Australia, was built on purpose as a compromise between Sydney and Melbourne.",
]

CHATS = [
    ("What is the largest planet in the solar system?",
     "The largest planet in the solar system is Jupiter. It is a gas giant more than eleven times as wide "
     "as the Earth."),
    ("Can you give me a tip for sleeping better?",
     "Try to go to bed and get up at the same time every day, and keep your bedroom cool, dark and quiet."),
    ("How many legs does a spider have?",
     "A spider has eight legs. Insects, by contrast, have six."),
    ("Write a short sentence about the sea.",
     "The sea rolled in slowly, silver under the evening sky."),
    ("What is two plus three?",
     "Two plus three is five."),
    ("Who wrote the play Romeo and Juliet?",
     "Romeo and Juliet was written by William Shakespeare."),
]
