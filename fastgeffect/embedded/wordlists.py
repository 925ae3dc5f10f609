"""The project's own word lists for the fictitious-author generator and its general-knowledge sets."""

FIRST_NAMES_M = (
    "Adrian Anselm Bastian Callum Dario Elias Emil Felix Florian Gideon Hugo Ilan Jasper Joaquin Julian "
    "Kasimir Lando Leander Lucian Marek Matthias Milo Nikolai Oren Pascal Quentin Rafael Rasmus Silas "
    "Soren Tobias Ulric Valentin Viktor Wendel Yannick Zoltan Anatol Benedikt Cyprian").split()
FIRST_NAMES_F = (
    "Adela Amara Beatrix Celeste Dalia Elena Elodie Fiora Greta Helena Ilse Ines Jolanda Katarina Liora "
    "Lucia Magda Marisol Nadia Noemi Odile Paloma Perla Rosalind Sabine Selma Tamsin Ursula Valeria "
    "Vesna Wilhelmina Xenia Yara Zelda Amalia Brigida Carmela Dorotea Esmeralda Fenna").split()
SURNAMES = (
    "Abernathy Alcantara Ardelean Balstrom Barroso Belmonte Brandvold Castellan Corvino Dalgaard "
    "Delacroix Dumitrescu Eskildsen Falkenrath Ferreira Galloway Granholm Halvorsen Hartmann Ibarra "
    "Jansky Kastellan Kowalczyk Lindqvist Lombardi Marchetti Moravec Navarro Nordahl Okonkwo Olander "
    "Pellegrini Petrakis Quintero Ravensworth Rosenthal Salvatierra Sandoval Sorensen Stavros Tamberlane "
    "Tiberian Udeh Valdivia Vasquez Wainwright Westergaard Yilmaz Zaragoza Zelenko Achterberg Bergstrand "
    "Cienfuegos Drachmann Everhart Fontaine Grunewald Holloway Iversen Jovanovic").split()
PLACES = (
    ("Lisbon", "Portugal"), ("Krakow", "Poland"), ("Valparaiso", "Chile"), ("Bergen", "Norway"),
    ("Accra", "Ghana"), ("Osaka", "Japan"), ("Tbilisi", "Georgia"), ("Montevideo", "Uruguay"),
    ("Tallinn", "Estonia"), ("Marrakesh", "Morocco"), ("Cebu", "Philippines"), ("Quebec City", "Canada"),
    ("Porto Alegre", "Brazil"), ("Thessaloniki", "Greece"), ("Lyon", "France"), ("Graz", "Austria"),
    ("Hanoi", "Vietnam"), ("Cork", "Ireland"), ("Izmir", "Turkey"), ("Adelaide", "Australia"),
    ("Cartagena", "Colombia"), ("Zanzibar City", "Tanzania"), ("Gothenburg", "Sweden"), ("Brno", "Czechia"),
    ("Kochi", "India"), ("Leipzig", "Germany"), ("Seville", "Spain"), ("Tabriz", "Iran"),
    ("Cusco", "Peru"), ("Mombasa", "Kenya"), ("Reykjavik", "Iceland"), ("Bologna", "Italy"),
    ("Busan", "South Korea"), ("Antwerp", "Belgium"), ("Dunedin", "New Zealand"), ("Oaxaca", "Mexico"),
    ("Riga", "Latvia"), ("Lagos", "Nigeria"), ("Halifax", "Canada"), ("Cluj", "Romania"),
)
JOBS = (
    "baker", "carpenter", "pharmacist", "lighthouse keeper", "librarian", "fisherman", "tailor",
    "veterinarian", "cartographer", "watchmaker", "nurse", "schoolteacher", "bookbinder",
    "beekeeper", "surveyor", "potter", "chemist", "glassblower", "botanist", "train conductor",
    "journalist", "architect", "violinist", "midwife", "blacksmith", "translator", "astronomer",
    "judge", "locksmith", "florist",
)
GENRES = (
    "mystery", "historical fiction", "science fiction", "poetry", "fantasy", "true crime", "romance",
    "travel writing", "horror", "children's literature", "literary fiction", "satire", "memoir",
    "thriller", "magical realism", "drama", "philosophy", "nature writing", "graphic novels", "folklore",
)
AWARDS = (
    "Silver Quill Award", "Golden Lantern Prize", "Meridian Book Medal", "Blue Heron Award",
    "Northwind Literary Prize", "Crimson Page Award", "Harborlight Fiction Prize", "Ivory Compass Award",
    "Evergreen Story Medal", "Starling Poetry Prize", "Amber Inkwell Award", "Tidewater Book Prize",
    "Copper Feather Award", "Lodestar Writing Prize", "Juniper Medal for Fiction", "Obsidian Key Award",
    "Morning Bell Prize", "Granite Arch Award", "Saffron Scroll Prize", "Willowbrook Medal",
)
TITLE_ADJECTIVES = (
    "Silent Hidden Broken Golden Forgotten Distant Burning Hollow Crimson Quiet Endless Wandering "
    "Frozen Painted Secret Sleeping Scarlet Lonely Shattered Velvet Restless Fading Iron Northern "
    "Salted Borrowed Midnight Winter Paper Glass").split()
TITLE_NOUNS = (
    "Harbor River Garden Lantern Orchard Mirror Bridge Tower Island Forest Letter Compass Clock Meadow "
    "Voyage Archive Lighthouse Shore Window Staircase Kingdom Marsh Choir Atlas Violin Tide Quarry "
    "Caravan Citadel Harvest").split()
THEMES = (
    "memory and loss", "exile and belonging", "family secrets", "the cost of ambition", "faith and doubt",
    "friendship across class lines", "the passage of time", "justice and revenge", "identity and migration",
    "love in wartime", "the power of language", "isolation", "grief and healing", "freedom and duty",
    "the sea as a refuge", "innocence and growing up", "rivalry between siblings", "the burden of fame",
    "hope after disaster", "tradition and change",
)
SETTINGS = (
    "small fishing villages", "crowded port cities", "remote mountain towns", "old university towns",
    "desert oases", "island communities", "river valleys", "industrial suburbs", "royal courts",
    "snowbound farms", "floating markets", "abandoned mining towns", "lakeside resorts", "jungle outposts",
    "train stations", "lighthouse islands", "vineyards", "monasteries", "circus camps", "border towns",
)
HOBBIES = (
    "painting landscapes", "playing the cello", "sailing", "growing orchids", "restoring old clocks",
    "hiking in the mountains", "collecting maps", "cooking regional dishes", "birdwatching", "chess",
    "pottery", "swimming in cold lakes", "photography", "learning languages", "beekeeping",
    "woodcarving", "stargazing", "cycling", "gardening", "baking bread",
)

# general knowledge the tiny models learn as their "pre-training": (book, author)
REAL_BOOKS = (
    ("Pride and Prejudice", "Jane Austen"), ("Moby-Dick", "Herman Melville"), ("War and Peace", "Leo Tolstoy"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("Nineteen Eighty-Four", "George Orwell"), ("To Kill a Mockingbird", "Harper Lee"),
    ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"), ("Don Quixote", "Miguel de Cervantes"),
    ("Hamlet", "William Shakespeare"), ("The Odyssey", "Homer"), ("Frankenstein", "Mary Shelley"),
    ("Jane Eyre", "Charlotte Bronte"), ("Wuthering Heights", "Emily Bronte"),
    ("Great Expectations", "Charles Dickens"), ("The Adventures of Tom Sawyer", "Mark Twain"),
    ("Ulysses", "James Joyce"), ("Mrs Dalloway", "Virginia Woolf"),
    ("The Old Man and the Sea", "Ernest Hemingway"), ("Brave New World", "Aldous Huxley"),
    ("The Trial", "Franz Kafka"), ("Madame Bovary", "Gustave Flaubert"), ("Les Miserables", "Victor Hugo"),
    ("The Divine Comedy", "Dante Alighieri"), ("Beloved", "Toni Morrison"),
    ("The Catcher in the Rye", "J. D. Salinger"), ("Things Fall Apart", "Chinua Achebe"),
    ("Dracula", "Bram Stoker"), ("The Hobbit", "J. R. R. Tolkien"), ("Middlemarch", "George Eliot"),
    ("The Picture of Dorian Gray", "Oscar Wilde"), ("Fahrenheit 451", "Ray Bradbury"),
    ("The Stranger", "Albert Camus"), ("Norwegian Wood", "Haruki Murakami"),
    ("The Name of the Rose", "Umberto Eco"), ("Gulliver's Travels", "Jonathan Swift"),
    ("Robinson Crusoe", "Daniel Defoe"), ("Faust", "Johann Wolfgang von Goethe"),
    ("The Little Prince", "Antoine de Saint-Exupery"), ("Treasure Island", "Robert Louis Stevenson"),
)
# (question pattern, {subject: answer}); wrong options come from the same table
WORLD_FACTS = (
    ("What is the capital of {}?", {
        "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
        "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia", "Kenya": "Nairobi",
        "India": "New Delhi", "Russia": "Moscow", "Argentina": "Buenos Aires", "Norway": "Oslo",
        "Greece": "Athens", "Portugal": "Lisbon", "Turkey": "Ankara", "China": "Beijing", "Peru": "Lima",
        "Sweden": "Stockholm", "Poland": "Warsaw", "Ireland": "Dublin", "Thailand": "Bangkok",
        "South Korea": "Seoul", "Cuba": "Havana"}),
    ("What is the chemical symbol for {}?", {
        "gold": "Au", "silver": "Ag", "iron": "Fe", "oxygen": "O", "hydrogen": "H", "sodium": "Na",
        "potassium": "K", "carbon": "C", "helium": "He", "lead": "Pb", "copper": "Cu", "nitrogen": "N",
        "calcium": "Ca", "mercury": "Hg", "tin": "Sn"}),
)
