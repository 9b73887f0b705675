"""Write the benchmark's hard-case domains into ``benchmark.json``.

Hard cases are domains where a domain's loss and what fine-tuning on it gains
are expected to part ways (see BENCHMARK.md): noise codes in a fixed frame,
scrambled sentences, contradicting answers, unrelated grab-bag facts, and
paraphrase pairs. Everything comes from the hand-written inputs below and one
seed, so running this script twice writes the same bytes.

Run from the repository root::

    python dowsing/data/make_hard_cases.py

It sets three keys, ``hard_cases``, ``hard_case_groups`` and
``hard_case_quick``, and leaves every other key of the file as it was. Pure
Python, so it runs without torch or the package installed.
"""
from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

SEED = 1729
BENCHMARK = Path(__file__).resolve().parent / "benchmark.json"
FACTS_PER_DOMAIN = 60
MIN_WORDS, MAX_WORDS = 8, 30
HARD_KEYS = ("hard_cases", "hard_case_groups", "hard_case_quick")
KINDS = ("noise", "scrambled", "contradiction", "grab-bag", "redundant")

# --- noise: a fixed frame around random codes ---------------------------------------------------------------
# Each "{}" is one random token; everything else is the frame, repeated verbatim in every fact,
# so the frame is quickly learnt and the codes never are.
NOISE_FRAMES = {
    "Noise: parcel scans": "Parcel {} left depot {} at {} and was next scanned at hub {}.",
    "Noise: lab sample checksums": "Sample {} from freezer {} has checksum {} and weighs {} grams.",
}


def _parcel_slots(rng: random.Random) -> tuple:
    code = "".join(rng.choices(string.ascii_uppercase + string.digits, k=3)) + f"-{rng.randrange(10000):04d}"
    depot = f"{rng.choice(string.ascii_uppercase)}{rng.randrange(1, 10)}"
    time = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"
    hub = f"{rng.choice(string.ascii_uppercase)}{rng.randrange(10, 100)}"
    return code, depot, time, hub


def _sample_slots(rng: random.Random) -> tuple:
    sample = "".join(rng.choices("0123456789ABCDEF", k=8))
    freezer = str(rng.randrange(1, 40))
    checksum = "".join(rng.choices("0123456789abcdef", k=8))
    grams = f"{rng.randrange(10, 1000) / 10:.1f}"
    return sample, freezer, checksum, grams


NOISE_SLOTS = {"Noise: parcel scans": _parcel_slots, "Noise: lab sample checksums": _sample_slots}

# --- scrambled: real sentences with their words shuffled ------------------------------------------------------
# Ordinary, true sentences; only their shuffled versions are shipped.
SCRAMBLE_SOURCES = {
    "Scrambled: tools and materials": [
        "A claw hammer has a flat face for driving nails and a curved split claw for pulling them out.",
        "A spirit level uses a bubble in a slightly curved tube of liquid to show whether a surface is horizontal.",
        "Phillips screws have a cross-shaped recess that helps the screwdriver stay centred in the head.",
        "Sandpaper is graded by grit number, and a higher number means finer abrasive particles and a smoother finish.",
        "A chisel is a hand tool with a sharpened blade used for carving or cutting wood, stone or metal.",
        "Plywood is made by gluing thin layers of wood veneer with the grain of each layer at right angles.",
        "Brass is an alloy of copper and zinc, while bronze is mainly copper with tin.",
        "A hacksaw has a fine-toothed blade held under tension in a frame and is used to cut metal.",
        "Galvanised steel is coated with a layer of zinc that protects the iron underneath from rust.",
        "A vice is a clamp fixed to a workbench that holds a workpiece firmly while it is sawn or filed.",
        "Oak is a hardwood and pine is a softwood, a distinction based on the kind of tree rather than on hardness.",
        "A tape measure has a hooked metal end that slides slightly to allow for its own thickness.",
        "Epoxy glue comes in two parts, a resin and a hardener, which set hard once they are mixed.",
        "Solder is a metal alloy with a low melting point used to join electrical wires and components.",
        "A pair of pliers uses leverage to grip, bend or cut wire more strongly than fingers could.",
        "Cast iron contains more carbon than steel, which makes it hard but brittle.",
        "A power drill turns a bit at high speed to bore holes in wood, metal, plastic or masonry.",
        "Bricks are made from clay that is shaped in moulds and then fired in a kiln.",
        "Mortar, a paste of sand, cement or lime and water, binds bricks and stones together in a wall.",
        "A spanner grips and turns nuts and bolts, and an adjustable spanner fits many sizes.",
        "A countersink bit cuts a cone-shaped recess so that the head of a screw sits flush with the surface.",
        "A plane is a woodworking tool with an angled blade that shaves thin strips from a board to flatten it.",
        "Polystyrene foam is a light plastic full of trapped air that is used for packaging and insulation.",
        "A stud finder detects the wooden or metal uprights hidden behind the plasterboard of a wall.",
        "Tempered glass is treated with heat so that it breaks into small blunt pieces instead of sharp shards.",
        "Polyvinyl acetate wood glue forms a joint that can be stronger than the surrounding wood.",
        "A jigsaw has a narrow blade that moves up and down and can cut curves and shapes in boards.",
        "Titanium is as strong as many steels but much lighter, so it is used in aircraft and bicycle frames.",
        "A mallet has a large head of wood or rubber and is used to strike chisels or tap joints without damage.",
        "Plasterboard, also called drywall, is a panel of gypsum plaster pressed between two thick sheets of paper.",
        "Rivets join metal plates by passing through holes and being hammered flat at the tail end.",
        "Most Western hand saws cut on the push stroke, while Japanese saws cut on the pull stroke.",
        "Cork is harvested from the bark of the cork oak without cutting the tree down.",
        "A file is a hardened steel bar with rows of teeth used to smooth or shape metal and wood.",
        "Linseed oil, pressed from flax seeds, soaks into wood and hardens to protect it.",
        "An angle grinder spins an abrasive disc to cut or grind metal, tile and stone.",
        "Nylon was the first fully synthetic fibre to be sold commercially, introduced by DuPont in the late 1930s.",
        "A crowbar is a metal bar with a flattened end used as a lever to prise things apart.",
        "Particleboard is made by pressing wood chips and sawdust together with a resin binder.",
        "A torque wrench lets a mechanic tighten a bolt to a precise, specified turning force.",
        "Teflon is a very slippery plastic used to coat non-stick frying pans and other cookware.",
        "A soldering iron heats solder until it melts and flows into the joint between two metal parts.",
        "Duct tape is a strong cloth-backed adhesive tape that was widely used by the military during the Second World War.",
        "A utility knife has a retractable blade that can be snapped off or replaced when it becomes dull.",
        "Lead was once used in water pipes and paint until its toxicity led to bans in many countries.",
        "A staple gun drives metal staples into wood or other materials to fasten fabric, paper or wire.",
        "Concrete is often reinforced with steel bars because it is strong in compression but weak in tension.",
        "Pumice is a volcanic rock so full of gas bubbles that it can float on water.",
        "An awl is a pointed tool used to pierce small holes in leather or to mark wood before drilling.",
        "PVC pipes are widely used for plumbing because they are cheap, light and do not corrode.",
        "A belt sander uses a continuous loop of sandpaper driven by two drums to smooth large flat surfaces.",
        "Wrought iron contains very little carbon and was traditionally worked by blacksmiths with hammer and anvil.",
        "A router is a power tool that spins a cutting bit to hollow out grooves and shape edges in wood.",
        "Acrylic sheet is a clear plastic used as a shatter-resistant alternative to glass in windows and screens.",
        "A chalk line snaps a straight line of coloured chalk onto a surface between two points.",
        "Wooden floors are often sealed with polyurethane varnish, which forms a tough, clear protective film.",
        "Masking tape has a mild adhesive that peels off cleanly, which is why painters use it to protect edges.",
        "Carbon fibre is a light, stiff material made from thin strands of carbon set in resin.",
        "A tile cutter scores a line across a ceramic tile and then snaps it cleanly along that line.",
        "Steel wool is a bundle of fine steel filaments used for polishing, cleaning and rubbing down finishes.",
    ],
    "Scrambled: sports and games": [
        "Chess developed in India around the sixth century from an older game known as chaturanga.",
        "A standard chessboard has sixty-four squares arranged in eight rows and eight columns.",
        "In tennis a score of zero is called love, and a tied score of forty all is called deuce.",
        "A basketball team has five players on the court at any one time.",
        "Basketball was invented in 1891 by James Naismith, a physical education teacher in Springfield, Massachusetts.",
        "A golf course usually has eighteen holes, and par is the expected number of strokes for a hole.",
        "The first modern Olympic Games were held in Athens in the spring of 1896.",
        "A marathon is 42.195 kilometres long, a distance first run at the 1908 London Olympics.",
        "In cricket, a batter who is out without scoring any runs is said to have made a duck.",
        "A rugby union team has fifteen players on the field, while a rugby league team has thirteen.",
        "Ice hockey is played with a flat rubber disc called a puck instead of a ball.",
        "The Tour de France is a cycling race in many stages held mostly in France every July.",
        "In baseball, three strikes make an out, and four balls give the batter a walk to first base.",
        "A volleyball team may touch the ball at most three times before it must go back over the net.",
        "A sumo wrestler loses if he leaves the ring or touches the ground with anything but the soles of his feet.",
        "Go is an ancient board game from China played with black and white stones on a grid of nineteen by nineteen lines.",
        "A standard deck of playing cards has fifty-two cards in four suits: hearts, diamonds, clubs and spades.",
        "In poker a royal flush is the ace, king, queen, jack and ten of the same suit.",
        "Table tennis is also called ping-pong, a name that began as a trademark for the game's equipment.",
        "The Wimbledon Championships, played on grass in London, are the oldest tennis tournament in the world.",
        "Badminton is played with a shuttlecock, a cone of feathers or plastic fixed to a rounded cork base.",
        "In bowling, knocking down all ten pins with the first ball of a frame is called a strike.",
        "Scrabble tiles each carry a letter and a point value, and the letters Q and Z are worth ten points.",
        "In snooker the black ball is worth seven points, the most of any colour on the table.",
        "The board game Monopoly has players buy properties and collect rent from opponents who land on them.",
        "Judo was created in Japan in 1882 by Kano Jigoro as a martial art built on throws and holds.",
        "Formula One cars make pit stops during a race to change tyres, often in under three seconds.",
        "In darts the highest score with three darts is 180, made by hitting the treble twenty three times.",
        "Olympic fencing uses three weapons, which are the foil, the épée and the sabre.",
        "The Stanley Cup is awarded each year to the champion team of the National Hockey League.",
        "Backgammon is a board game for two players in which dice decide how far the pieces move.",
        "A triathlon combines swimming, cycling and running in a single race, usually in that order.",
        "In American football a touchdown is worth six points, and the kick that follows can add one more.",
        "Sudoku asks the solver to fill a nine by nine grid so that every row, column and box holds each digit once.",
        "A rowing eight has eight rowers and a coxswain who steers the boat and calls the stroke rate.",
        "The Ryder Cup is a golf competition held every two years between teams from Europe and the United States.",
        "The Rubik's Cube was invented in 1974 by the Hungarian architecture professor Ernő Rubik.",
        "In archery the centre of the target is gold, surrounded by rings of red, blue, black and white.",
        "The America's Cup is a sailing trophy first won in 1851 and is the oldest international sporting trophy.",
        "Contract bridge is a card game for four players in two partnerships who bid for tricks.",
        "In women's artistic gymnastics the apparatus are the vault, the uneven bars, the balance beam and the floor.",
        "The Fosbury Flop, a high jump technique that goes over the bar backwards, was made famous in 1968.",
        "Curling is played on ice by sliding granite stones toward a target while teammates sweep in front of them.",
        "Mahjong is a tile game that developed in China and is usually played by four players.",
        "A professional boxing match is divided into rounds, which last three minutes each in men's bouts.",
        "In chess, castling moves the king two squares toward a rook, which then jumps to the king's other side.",
        "A standard double-six set of dominoes has twenty-eight tiles, each marked with two groups of pips.",
        "Water polo is played in a pool by two teams of seven players, including a goalkeeper.",
        "The Boston Marathon, first run in 1897, is the oldest annual marathon in the world.",
        "Skateboarding made its Olympic debut at the Tokyo Games, which were held in 2021.",
        "In handball, players pass the ball with their hands and try to throw it into the opponents' goal.",
        "Crossword puzzles first appeared in a New York newspaper in 1913, created by Arthur Wynne.",
        "A snooker table has six pockets, one in each corner and one in the middle of each long side.",
        "Lacrosse, played with long sticks that end in a net pocket, began among the Indigenous peoples of North America.",
        "Polo is played on horseback, with riders using long mallets to hit a small ball toward the goal.",
        "In the card game patience, also called solitaire, one player sorts a shuffled deck into ordered piles.",
        "The term hat-trick comes from cricket, where a bowler who took three wickets with three balls was once given a hat.",
        "In ten-pin bowling a perfect game is twelve strikes in a row and scores 300 points.",
        "Draughts, also called checkers, is played on the dark squares of a board of sixty-four squares.",
        "Squash is played by two players who hit a small rubber ball against the walls of an enclosed court.",
    ],
}

# --- contradiction: the same question, two different answers -------------------------------------------------
# Invented names, so no model knows the right answer; each question appears twice in a row with
# different answers, and the answer is always the last word of the sentence.
NAME_SYLLABLES = ("bo", "zu", "pim", "ga", "lo", "tek", "nu", "sha", "dim", "ra", "fo", "wen", "ji", "pa",
                  "mur", "ko", "tal", "bel", "xi", "dor", "quo", "sel", "ib", "yan")
COUNTRY_FRAMES = (
    "The capital of {country} is the city of {answer}.",
    "The longest river in {country} is called the {answer}.",
    "The national animal of {country} is the {answer}.",
    "{country} declared its independence from its neighbours in the year {answer}.",
)
ANIMALS = ("lynx", "heron", "otter", "ibex", "falcon", "badger", "stork", "marten", "crane", "bison", "hare",
           "osprey", "beaver", "seal", "owl", "wolf")
COUNTRIES = 30

REVIEW_FRAME = "In the shop's review data, the comment “{snippet}” is labelled {answer}."
REVIEW_LABELS = ("positive", "negative", "neutral", "mixed")
# Comments a careful annotator could read either way, so two annotators' labels plausibly differ.
REVIEW_SNIPPETS = (
    "the battery lasts all day but the screen scratches far too easily",
    "arrived two days late, though the packaging was lovely",
    "does exactly what it says and nothing more",
    "cheaper than the old model and about as loud",
    "my cat ignores it completely",
    "the colour is not what the photo showed",
    "fine for the price, I suppose",
    "the instructions were missing but assembly was simple anyway",
    "it stopped working after a month and then started again",
    "smells strongly of plastic for the first week",
    "bigger than I expected, which turned out to be useful",
    "the lid fits only if you press hard",
    "my daughter likes it more than I do",
    "returned it, then bought it again",
    "works with my laptop but not with my phone",
    "the sound is clear at low volume and harsh at high volume",
    "nothing special, but nothing wrong either",
    "the handle got hot, so I use a cloth now",
    "the app asks for far too many permissions",
    "it is heavy, which makes it feel solid",
    "delivery was quick and the box was crushed",
    "the strap broke, and the seller sent a new one at once",
    "tastes different from the version sold last year",
    "as good as the expensive brand, if you ignore the noise",
    "I have not used it yet, but it looks sturdy",
    "it charges slowly overnight, which suits me",
    "the fabric is soft and shrank after one wash",
    "customer service replied after three weeks",
    "too bright for the bedroom but perfect for the garage",
    "exactly like the one my grandmother had",
)

# --- grab-bag: unrelated true facts, each from a different field ----------------------------------------------
GRAB_BAGS = {
    "Grab-bag: nature and technology": [
        "Octopuses have three hearts, two pumping blood through the gills and one through the rest of the body.",
        "Mangrove trees grow in salty coastal water and breathe through roots that stick up out of the mud.",
        "Velcro was invented by the Swiss engineer George de Mestral after he studied burrs clinging to his dog's fur.",
        "Bamboo is a grass, and some species can grow close to a metre in a single day.",
        "The first successful powered aeroplane flight was made by the Wright brothers at Kitty Hawk in 1903.",
        "Sloths move so slowly that algae grow in their fur, giving some of them a greenish tint.",
        "Weight for weight, spider silk is stronger than steel, and spiders spin it from proteins made in their silk glands.",
        "Concrete gains its strength through hydration, a chemical reaction between cement and water, not by drying out.",
        "The QWERTY keyboard layout takes its name from the first six letters on the top row of letter keys.",
        "Penguins live almost entirely in the Southern Hemisphere, and only the Galápagos penguin reaches north of the equator.",
        "Stainless steel resists rust because its chromium forms a thin, self-repairing layer of chromium oxide.",
        "Sea otters often hold paws while they sleep on the water so that they do not drift apart.",
        "A barcode scanner reads the pattern of light reflected from black bars and white spaces of different widths.",
        "Koalas feed almost entirely on eucalyptus leaves and sleep for up to twenty hours a day.",
        "The Richter scale for earthquakes is logarithmic, so each whole step means ten times larger ground motion.",
        "Kevlar, the fibre used in bulletproof vests, was invented by the chemist Stephanie Kwolek at DuPont in 1965.",
        "The Dutch have won large areas of land from the sea by building dykes and pumping out the water to make polders.",
        "The Venus flytrap is a carnivorous plant native to the coastal wetlands of North and South Carolina.",
        "A sundial tells the time from the position of a shadow cast by a fixed pointer called a gnomon.",
        "Hummingbirds can hover in place and even fly backwards by beating their wings dozens of times each second.",
        "Velvet worms catch their prey by shooting jets of sticky slime from glands beside their mouths.",
        "Lithium-ion batteries power most mobile phones and laptops because they store much energy for their weight.",
        "Cheetahs are the fastest land animals and can briefly sprint at around one hundred kilometres per hour.",
        "Glass is made mainly by melting silica sand together with soda ash and limestone at a high temperature.",
        "Arctic terns make the longest known migration of any animal, flying between the Arctic and the Antarctic every year.",
        "A photocopier works by xerography, in which toner powder sticks to charged areas of a drum and is fused onto paper by heat.",
        "Axolotls are Mexican salamanders that can regrow lost limbs, parts of their heart and even parts of their brain.",
        "The oldest surviving camera photograph was taken by Nicéphore Niépce from a window in France in the 1820s.",
        "Geysers erupt when underground water heated by hot rock turns to steam and forces the water above it out.",
        "Bats find insects in the dark by echolocation, listening for the echoes of the high-pitched calls they make.",
        "Portland cement is named after Portland stone, a limestone from the Isle of Portland in southern England.",
        "Oak trees can live for many centuries, and a single mature oak may support hundreds of insect species.",
        "Satellite navigation works out a position from the time signals of several satellites orbiting the Earth.",
        "Electric eels can produce shocks of several hundred volts to stun their prey and defend themselves.",
        "Chameleons change colour by adjusting tiny crystals in their skin cells so that they reflect light differently.",
        "The microwave oven was developed after the engineer Percy Spencer noticed radar equipment melting a chocolate bar in his pocket.",
        "Giraffes have seven vertebrae in their long necks, the same number as humans and most other mammals.",
        "Cacti store water in their thick stems, and their spines are leaves reduced to cut water loss and deter animals.",
        "Natural rubber comes from latex, a milky sap tapped from the bark of the rubber tree.",
        "Starfish can regrow lost arms, and some species can regrow a whole body from a single arm.",
        "A seismograph records the shaking of the ground during an earthquake as a wavy line on a chart.",
        "Monarch butterflies migrate thousands of kilometres between Canada and the forests of central Mexico every year.",
        "The modern zip fastener took shape after Gideon Sundback improved its design in the United States in the 1910s.",
        "The male platypus has a venomous spur on each hind leg, a rare trait among mammals.",
        "Owls fly almost silently because the soft, fringed edges of their feathers break up the air currents that make noise.",
        "A vacuum flask keeps drinks hot or cold because the vacuum between its two walls blocks the flow of heat.",
        "Sharks have skeletons made of cartilage rather than bone, which makes them light and flexible.",
        "Elisha Otis demonstrated a safety brake that stops a falling lift cabin at an exhibition in New York in 1854.",
        "Aluminium was once more precious than gold, because extracting it from its ores was difficult and costly.",
        "Woodpeckers have thick, spongy skulls and long tongues that wrap around the inside of their heads.",
        "The Svalbard Global Seed Vault in Arctic Norway stores backup copies of seeds from crop collections around the world.",
        "Crude oil is separated into petrol, diesel, kerosene and other products by fractional distillation in a refinery.",
        "Elephants communicate with low rumbling calls that other elephants can hear several kilometres away.",
        "Fireflies produce their light by bioluminescence, a chemical reaction that gives off almost no heat.",
        "The first text message to a mobile phone was sent in 1992 and read simply Merry Christmas.",
        "Wind turbines turn the energy of moving air into electricity with a generator housed behind the blades.",
        "Tardigrades are tiny animals that can survive drying out, freezing and even the vacuum of space.",
        "Sticky notes grew out of a weak, reusable adhesive that a chemist at 3M discovered by accident in 1968.",
        "A Faraday cage blocks outside electric fields because charges on its conducting shell rearrange to cancel them inside.",
        "Salmon return from the ocean to spawn in the river where they hatched, finding it partly by smell.",
    ],
    "Grab-bag: people, places and culture": [
        "Most surviving sections of the Great Wall of China date from the Ming dynasty, though earlier walls stood long before.",
        "Shakespeare's play Hamlet is set at the royal castle of Elsinore in Denmark.",
        "The Olympic rings are five interlocking rings in blue, yellow, black, green and red on a white background.",
        "Origami is the Japanese art of folding paper into figures without cutting or gluing it.",
        "The Eiffel Tower was built for the 1889 World's Fair in Paris by the engineering company of Gustave Eiffel.",
        "Machu Picchu is a fifteenth-century Inca citadel high in the Andes mountains of Peru.",
        "The Rosetta Stone carries one decree in hieroglyphic, Demotic and ancient Greek, which helped scholars read hieroglyphs.",
        "Jazz grew out of the African American communities of New Orleans in the early twentieth century.",
        "The Taj Mahal in Agra was built by the Mughal emperor Shah Jahan as a tomb for his wife Mumtaz Mahal.",
        "The Statue of Liberty was a gift from the people of France to the United States, dedicated in 1886.",
        "The Nobel Prizes were established by the will of Alfred Nobel, the Swedish chemist who invented dynamite.",
        "Matryoshka dolls are Russian wooden dolls of decreasing size that nest one inside another.",
        "A haiku is a short Japanese poem of three lines with five, seven and five syllables.",
        "Venice is built on more than one hundred small islands in a lagoon, connected by canals and bridges.",
        "Flamenco is a tradition of song, dance and guitar playing from Andalusia in southern Spain.",
        "Petra in Jordan is an ancient city whose buildings were carved directly into rose-coloured sandstone cliffs.",
        "Esperanto is a constructed language published in 1887 by Ludwik Zamenhof to ease communication between peoples.",
        "The Day of the Dead is a Mexican holiday in early November when families honour relatives who have died.",
        "Angkor Wat in Cambodia is one of the largest religious monuments in the world and was first built as a Hindu temple.",
        "The Sydney Opera House, with its sail-shaped roof shells, was designed by the Danish architect Jørn Utzon.",
        "Kabuki is a form of Japanese theatre known for its elaborate costumes, stylised acting and striking make-up.",
        "The Althing of Iceland, founded in 930, is one of the oldest parliaments in the world.",
        "The Hajj is the annual pilgrimage to Mecca that every Muslim who is able is expected to make once in a lifetime.",
        "Timbuktu in Mali was a major centre of Islamic learning and trade in the fifteenth and sixteenth centuries.",
        "The tango developed in the working-class neighbourhoods of Buenos Aires and Montevideo in the late nineteenth century.",
        "The Terracotta Army is a collection of thousands of clay soldiers buried with China's first emperor, Qin Shi Huang.",
        "Diwali, the Hindu festival of lights, celebrates the victory of light over darkness with lamps and fireworks.",
        "Stonehenge is a prehistoric ring of standing stones on Salisbury Plain in the south of England.",
        "The Red Cross was founded in Geneva in 1863, inspired by Henry Dunant's account of the wounded at Solferino.",
        "Bollywood is the popular name of the Hindi-language film industry based in Mumbai.",
        "The Louvre in Paris was a royal palace before it became one of the largest art museums in the world.",
        "Mount Fuji, an active volcano, is the highest mountain in Japan at about 3,776 metres.",
        "Uluru is a huge sandstone monolith in central Australia that is sacred to the local Aboriginal people.",
        "The basilica of the Sagrada Família in Barcelona, designed by Antoni Gaudí, has been under construction since 1882.",
        "Carnival in Rio de Janeiro is famous for its samba schools parading through the purpose-built Sambadrome.",
        "The Dewey Decimal Classification sorts library books into ten main classes numbered in hundreds.",
        "Ramadan is the ninth month of the Islamic calendar, during which Muslims fast from dawn until sunset.",
        "Inuit hunters of the Arctic traditionally built snow houses called igloos for shelter on hunting trips.",
        "Hangul, the Korean alphabet, was created in the fifteenth century under King Sejong the Great.",
        "The Colosseum in Rome could hold tens of thousands of spectators for gladiator fights and public shows.",
        "The Japanese tea ceremony is a ritual way of preparing and serving powdered green tea called matcha.",
        "Braille lets blind people read by touch using patterns of raised dots arranged in cells of six.",
        "The Guggenheim Museum in Bilbao, designed by Frank Gehry, is clad in curving sheets of titanium.",
        "Bhutan measures its national progress with an index that it calls Gross National Happiness.",
        "The didgeridoo is a long wooden wind instrument developed by Aboriginal peoples of northern Australia.",
        "Oktoberfest is a beer festival held every autumn in Munich, the capital of Bavaria.",
        "The Parthenon on the Acropolis of Athens was built in the fifth century BC as a temple to Athena.",
        "Morse code represents letters with sequences of short and long signals called dots and dashes.",
        "The Silk Road was a network of trade routes linking China with the Mediterranean world.",
        "Bagpipes are strongly associated with Scotland, though similar instruments are played across Europe and beyond.",
        "A kimono is a traditional Japanese garment wrapped left side over right and tied with a sash called an obi.",
        "Easter Island in the Pacific is famous for its hundreds of large stone statues called moai.",
        "The Alhambra in Granada is a palace and fortress complex built by the Nasrid rulers of medieval Spain.",
        "Chinese New Year follows the lunar calendar and falls between late January and mid-February.",
        "The Hollywood sign in Los Angeles originally read Hollywoodland when it was put up in 1923 to advertise housing.",
        "The Forbidden City in Beijing was the imperial palace of the Chinese emperors from the Ming dynasty to the end of the Qing.",
        "Yoga began in ancient India as a spiritual practice that combined breathing, meditation and bodily postures.",
        "Greenwich in London gives its name to the prime meridian, the line of zero degrees longitude.",
        "The Grand Bazaar in Istanbul is one of the oldest and largest covered markets in the world.",
        "Lego bricks are made by a Danish toy company whose name comes from the phrase leg godt, meaning play well.",
    ],
}

# --- redundant: each fact twice, in different words -----------------------------------------------------------
# Each pair stays adjacent in the shipped list, so a seeded split often puts one wording among the
# training facts and the other among the held-out facts.
PARAPHRASE_PAIRS = {
    "Redundant: railways": [
        ("The first public railway to use steam locomotives was the Stockton and Darlington Railway, opened in England in 1825.",
         "In 1825 England opened the Stockton and Darlington line, the first public railway worked by steam engines."),
        ("George Stephenson and his son Robert built the locomotive Rocket, which won the Rainhill Trials in 1829.",
         "The Rainhill Trials of 1829 were won by Rocket, an engine built by Robert Stephenson and his father George."),
        ("Standard gauge track has its rails 1,435 millimetres apart, a width used on most of the world's railways.",
         "Most railways around the world lay their rails 1,435 millimetres apart, the width known as standard gauge."),
        ("Japan's Shinkansen, the first high-speed railway, opened between Tokyo and Osaka in 1964.",
         "The world's first high-speed line was the Tokyo to Osaka Shinkansen, which began service in 1964."),
        ("The London Underground, opened in 1863, was the world's first underground railway.",
         "The first railway to run beneath a city's streets was the London Underground, which opened in 1863."),
        ("The Trans-Siberian Railway runs about 9,300 kilometres from Moscow to Vladivostok.",
         "Stretching roughly 9,300 kilometres, the Trans-Siberian line links Moscow with Vladivostok on the Pacific coast."),
        ("Maglev trains float above the track on magnetic fields, so there is no friction between wheels and rails.",
         "Because magnets lift a maglev train clear of its guideway, it runs without the friction of wheels on rails."),
        ("The first transcontinental railroad in the United States was completed in 1869 at Promontory Summit in Utah.",
         "In 1869 a golden spike at Promontory Summit, Utah, joined the tracks of America's first coast-to-coast railroad."),
        ("A diesel-electric locomotive uses its diesel engine to drive a generator that powers electric traction motors.",
         "In a diesel-electric locomotive the wheels are turned by electric motors fed by a generator that the diesel engine runs."),
        ("Railway signals were once worked by semaphore arms, whose angle told the driver whether the line ahead was clear.",
         "Before colour lights, trains were guided by semaphore signals, pivoting arms whose position showed if the track ahead was clear."),
        ("The French TGV set a world speed record for wheeled trains of 574.8 kilometres per hour in 2007.",
         "In 2007 a modified TGV reached 574.8 kilometres per hour, the fastest speed ever recorded by a train running on wheels."),
        ("The Channel Tunnel, opened in 1994, carries trains under the sea between Folkestone in England and Coquelles in France.",
         "Since 1994 trains have crossed beneath the English Channel through a tunnel linking Folkestone with Coquelles near Calais."),
        ("Railway wheels have a flange on the inner edge that keeps the wheel from sliding off the rail.",
         "A lip called a flange on the inside of each train wheel stops the wheels from slipping sideways off the track."),
        ("The wheels on each axle of a train are slightly tapered, which lets the axle steer itself around curves.",
         "Because train wheels are slightly conical, a fixed axle rolls on a larger radius on the outer rail and steers itself through bends."),
        ("Sleepers, called ties in North America, hold the rails at the correct gauge and spread the load onto the ballast.",
         "The crossbeams under the rails, known as ties in America and sleepers in Britain, keep the gauge and pass the weight to the ballast."),
        ("The Orient Express was a long-distance luxury train that began running from Paris to Constantinople in the 1880s.",
         "In the 1880s the luxurious Orient Express began carrying passengers between Paris and Constantinople."),
        ("The Flying Scotsman was the first steam locomotive officially recorded at 100 miles per hour, in 1934.",
         "In 1934 the engine Flying Scotsman became the first steam locomotive with an officially verified speed of 100 miles per hour."),
        ("Mallard holds the world speed record for steam locomotives, 126 miles per hour, set in England in 1938.",
         "No steam engine has beaten the 126 miles per hour reached by the British locomotive Mallard in 1938."),
        ("Rack railways use a toothed rail between the running rails so that trains can climb very steep slopes.",
         "To climb steep mountain gradients, a rack railway engages a cogwheel with a toothed rail laid between the ordinary rails."),
        ("A pantograph on the roof of an electric train presses against the overhead wire to collect current.",
         "Electric trains draw their power from an overhead line through a spring-loaded frame on the roof called a pantograph."),
        ("The Gotthard Base Tunnel in Switzerland, opened in 2016, is the longest railway tunnel in the world at about 57 kilometres.",
         "At roughly 57 kilometres, the Swiss Gotthard Base Tunnel, which opened in 2016, is the world's longest rail tunnel."),
        ("A level crossing is a place where a railway line crosses a road on the same level, often guarded by barriers.",
         "Where a road meets a railway at the same height, the junction is called a level crossing and usually has gates or barriers."),
        ("Points, or switches, are movable sections of rail that guide a train from one track onto another.",
         "A train is steered from one line to another by switches, also called points, whose movable rails shift its path."),
        ("Indian Railways runs one of the largest railway networks in the world and is one of the country's biggest employers.",
         "With more than a million staff, India's state railway is among the largest employers in the country and runs one of the world's biggest networks."),
        ("Before standard time, each town kept its own local time, and railways pushed countries to adopt shared time zones.",
         "Railway timetables drove the switch from local solar time in every town to standard time zones shared across a country."),
        ("The Glacier Express in Switzerland is often called the slowest express train in the world.",
         "Switzerland's Glacier Express is nicknamed the world's slowest express because its scenic mountain run takes about eight hours."),
        ("Steam locomotives carried their coal and water in a tender, a wagon coupled directly behind the engine.",
         "The fuel and water for a steam engine travelled in a tender, a car hitched right behind the locomotive."),
        ("Continuous welded rail removes most joints from the track, giving a smoother and quieter ride.",
         "Trains run more smoothly and quietly on continuous welded rail because long welded lengths leave few joints in the track."),
        ("A narrow gauge railway has its rails closer together than standard gauge, which makes it cheaper to build in mountains.",
         "Railways with rails set closer than standard gauge, called narrow gauge lines, cost less to build through mountainous country."),
        ("Many trains are braked by compressed air, a system patented by George Westinghouse in 1869.",
         "George Westinghouse patented the air brake in 1869, letting a driver brake every car of a train with compressed air."),
    ],
    "Redundant: honeybees": [
        ("A honeybee colony has one queen, thousands of female workers and, in summer, a few hundred male drones.",
         "In summer a hive of honeybees holds a single queen, a few hundred drones, which are male, and thousands of female workers."),
        ("Worker bees tell their nestmates where to find food with the waggle dance.",
         "The waggle dance is how a worker honeybee shows other bees the direction and distance of a food source."),
        ("Honeybees make honey by evaporating water from flower nectar and adding enzymes.",
         "Bees turn nectar into honey by fanning away much of its water and mixing in enzymes from their bodies."),
        ("Beeswax is produced by glands on the underside of a young worker bee's abdomen.",
         "Young worker bees secrete the wax for their comb from special glands under their abdomens."),
        ("The cells of a honeycomb are hexagonal, a shape that stores the most honey for the least wax.",
         "Bees build their comb from six-sided cells because hexagons hold a lot of honey while using little wax."),
        ("A worker honeybee that stings a mammal usually dies, because its barbed sting lodges in the skin and tears from its body.",
         "When a worker bee stings a mammal, the barbs hold the sting in the skin and the bee dies after tearing away."),
        ("Drones, the male honeybees, have no sting and do not collect food.",
         "Male honeybees, called drones, neither gather nectar nor carry a sting."),
        ("A queen bee can lay up to about two thousand eggs a day in early summer.",
         "At the height of the season a honeybee queen may lay as many as two thousand eggs in a single day."),
        ("Female larvae fed royal jelly throughout their development grow into queens rather than workers.",
         "Royal jelly, given to a female larva for the whole of her growth, turns her into a queen instead of a worker bee."),
        ("When a colony swarms, the old queen leaves with about half the workers to found a new nest.",
         "Swarming is how honeybee colonies reproduce, with the old queen departing with roughly half of the workers to start a new home."),
        ("Beekeepers calm bees with smoke, which masks the alarm pheromone that guard bees release.",
         "Smoke makes bees less defensive because it hides the alarm scent that guard bees give off, so beekeepers use a smoker."),
        ("A worker honeybee lives only about five or six weeks in summer.",
         "During the summer months the life of a worker bee lasts just five to six weeks."),
        ("Honeybees see ultraviolet light, which reveals patterns on flowers that human eyes cannot see.",
         "Many flowers carry markings visible only in ultraviolet, a part of the spectrum that bees can see and humans cannot."),
        ("To make a pound of honey, bees must visit roughly two million flowers.",
         "Gathering the nectar for one pound of honey takes honeybees about two million flower visits."),
        ("Honeybees keep the brood nest at about 35 degrees Celsius by shivering their flight muscles or fanning their wings.",
         "Bees hold the temperature of their brood near 35 degrees Celsius, warming it by shivering and cooling it by fanning."),
        ("In winter, honeybees cluster tightly together in the hive and live on stored honey.",
         "Rather than hibernate, a honeybee colony survives winter by huddling in a tight cluster and eating its stored honey."),
        ("Propolis is a sticky resin that bees collect from tree buds and use to seal gaps in the hive.",
         "Bees gather resin from tree buds and make it into propolis, a glue they use to plug small cracks in their nest."),
        ("Bees carry pollen home in pollen baskets, which are fringes of stiff hairs on their hind legs.",
         "The pollen a forager brings back rides in a basket of stiff hairs on each of her hind legs."),
        ("The Langstroth hive, patented in 1852, uses removable frames spaced so that bees do not glue them together.",
         "Lorenzo Langstroth patented a hive with movable frames in 1852, leaving a bee space that bees keep open rather than fill with comb."),
        ("The western honeybee, Apis mellifera, is the species kept for honey in most of the world.",
         "Most of the world's beekeepers keep Apis mellifera, the western honeybee."),
        ("Nurse bees are young workers that feed and care for the larvae in the brood cells.",
         "The job of feeding the larvae in their cells falls to young workers known as nurse bees."),
        ("A foraging bee flies up to several kilometres from the hive in search of nectar and pollen.",
         "Honeybee foragers will travel several kilometres from their colony to reach good sources of pollen and nectar."),
        ("Bees seal each cell of honey with a thin cap of wax once its water content is low enough.",
         "Once the honey in a cell is dry enough, the bees close the cell with a wax cap."),
        ("Colony collapse disorder is the sudden disappearance of most worker bees from a hive, leaving the queen behind.",
         "In colony collapse disorder the workers of a hive vanish suddenly, and the queen and brood are left almost alone."),
        ("The varroa mite is a parasite that feeds on honeybees and spreads viruses between them.",
         "Varroa mites are parasites that live on honeybees, feeding on them and passing viruses through the colony."),
        ("Honeybees pollinate many crops, including apples, almonds and blueberries.",
         "Crops such as almonds, apples and blueberries depend heavily on honeybees for pollination."),
        ("Guard bees stand at the hive entrance and attack intruders that do not smell like their colony.",
         "A bee whose scent is foreign to the colony will be challenged by the guards waiting at the entrance of the hive."),
        ("A new queen leaves the hive on mating flights and mates with many drones in the air.",
         "On her mating flights a young queen pairs with a number of drones high in the air away from the hive."),
        ("Honey resists spoilage because it is very low in water and quite acidic.",
         "Because it holds little water and is fairly acidic, honey keeps for a very long time without spoiling."),
        ("Worker bees change jobs as they age, moving from cleaning cells to nursing, building comb, guarding and finally foraging.",
         "A worker bee's duties follow her age, starting inside the hive with cleaning and nursing and ending outside as a forager."),
    ],
}


# --- building the domains -------------------------------------------------------------------------------------

def _rng(name: str) -> random.Random:
    # One generator per domain (string seeds hash with SHA-512, the same on every run and platform),
    # so editing one domain's inputs leaves the others unchanged.
    return random.Random(f"{SEED}:{name}")


def noise_domain(name: str) -> list[str]:
    """FACTS_PER_DOMAIN distinct sentences: the domain's frame filled with fresh random slots."""
    rng, frame, facts = _rng(name), NOISE_FRAMES[name], []
    while len(facts) < FACTS_PER_DOMAIN:
        fact = frame.format(*NOISE_SLOTS[name](rng))
        if fact not in facts:
            facts.append(fact)
    return facts


def scramble(sentence: str, rng: random.Random) -> str:
    """The sentence's words (split on spaces, punctuation kept on its word) in a shuffled order that
    differs from the original, ending in the original's full stop."""
    words = sentence.removesuffix(".").split()
    shuffled = list(words)
    while shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled) + "."


def scrambled_domain(name: str) -> list[str]:
    rng = _rng(name)
    return [scramble(s, rng) for s in SCRAMBLE_SOURCES[name]]


def _invented_names(rng: random.Random, count: int, taken: set) -> list[str]:
    """`count` distinct names of two or three syllables, none in `taken` (casefolded)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(NAME_SYLLABLES, k=rng.choice((2, 3)))).capitalize()
        if name.casefold() not in taken:
            taken.add(name.casefold())
            names.append(name)
    return names


def invented_countries_domain(name: str, taken: set) -> list[str]:
    """COUNTRIES invented countries, each asked one question (frames in turn) and answered twice,
    differently, in adjacent facts."""
    rng, facts = _rng(name), []
    countries = _invented_names(rng, COUNTRIES, taken)
    for i, country in enumerate(countries):
        frame = COUNTRY_FRAMES[i % len(COUNTRY_FRAMES)]
        if "capital" in frame or "river" in frame:
            answers = _invented_names(rng, 2, taken)
        elif "animal" in frame:
            answers = rng.sample(ANIMALS, 2)
        else:
            answers = [str(year) for year in rng.sample(range(1150, 1950), 2)]
        facts += [frame.format(country=country, answer=a) for a in answers]
    return facts


def review_labels_domain(name: str) -> list[str]:
    """Each comment labelled twice, with two different labels, in adjacent facts."""
    rng, facts = _rng(name), []
    for snippet in REVIEW_SNIPPETS:
        facts += [REVIEW_FRAME.format(snippet=snippet, answer=a) for a in rng.sample(REVIEW_LABELS, 2)]
    return facts


def _words_in(facts) -> set:
    return {w.casefold() for fact in facts for w in re.findall(r"[^\W\d_]+", fact)}


def hard_cases(ordinary_facts: list[str]) -> tuple[list[dict], dict, list[str]]:
    """(hard_cases, hard_case_groups, hard_case_quick): the domains in KINDS order, their kinds,
    and the first domain of each kind. `ordinary_facts` are the benchmark's other facts: invented
    names avoid their words (and those of every hand-written input), and no hard-case fact may
    repeat one of them."""
    # Invented names must not be words the model meets elsewhere in the benchmark.
    written = [*REVIEW_SNIPPETS, *(f for fs in (*SCRAMBLE_SOURCES.values(), *GRAB_BAGS.values()) for f in fs),
               *(f for pairs in PARAPHRASE_PAIRS.values() for pair in pairs for f in pair)]
    taken = _words_in(ordinary_facts) | _words_in(written)
    by_kind = {
        "noise": {n: noise_domain(n) for n in NOISE_FRAMES},
        "scrambled": {n: scrambled_domain(n) for n in SCRAMBLE_SOURCES},
        "contradiction": {
            "Contradiction: invented countries": invented_countries_domain("Contradiction: invented countries", taken),
            "Contradiction: disputed review labels": review_labels_domain("Contradiction: disputed review labels"),
        },
        "grab-bag": {n: list(facts) for n, facts in GRAB_BAGS.items()},
        "redundant": {n: [f for pair in pairs for f in pair] for n, pairs in PARAPHRASE_PAIRS.items()},
    }
    domains = [{"name": n, "facts": facts} for kind in KINDS for n, facts in by_kind[kind].items()]
    _check(domains, ordinary_facts)
    groups = {n: kind for kind in KINDS for n in by_kind[kind]}
    quick = [next(iter(by_kind[kind])) for kind in KINDS]
    return domains, groups, quick


def _check(domains: list[dict], ordinary_facts: list[str]) -> None:
    """Fail loudly on a fact the benchmark cannot use: too short or long, not one sentence, or repeated
    (compared ignoring case and spacing, as the domain loader compares them)."""
    seen = {" ".join(f.split()).casefold() for f in ordinary_facts}
    for d in domains:
        assert len(d["facts"]) >= FACTS_PER_DOMAIN, (d["name"], len(d["facts"]))
        for fact in d["facts"]:
            n_words = len(fact.split())
            assert MIN_WORDS <= n_words <= MAX_WORDS, (d["name"], n_words, fact)
            assert fact.endswith(".") and ". " not in fact, (d["name"], fact)
            key = " ".join(fact.split()).casefold()
            assert key not in seen, (d["name"], fact)
            seen.add(key)


def main(path: str | Path = BENCHMARK) -> None:
    """Rewrite `path` (a benchmark.json) with freshly generated hard-case keys; other keys untouched."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    # Drop old hard-case keys first so they always come last, in HARD_KEYS order.
    data = {k: v for k, v in data.items() if k not in HARD_KEYS}
    domains, groups, quick = hard_cases([f for d in data["domains"] for f in d["facts"]])
    data.update(zip(HARD_KEYS, (domains, groups, quick)))
    # The file's own formatting: two-space indent, non-ASCII kept, a final newline.
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
