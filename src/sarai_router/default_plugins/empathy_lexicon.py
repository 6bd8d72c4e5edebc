"""Word and phrase tables of the empathy scorer, Spanish and English (accents stripped).

Single words are expanded once at import into every inflected form listed (so matching is a
set lookup, never a regex); multi-word phrases are matched as whole words on the normalised
text. Each entry belongs to one cue family; see ``empathy.py`` for what each family adds.

The tables were written from general knowledge of how people talk about feelings (an
emotion taxonomy: sadness, loneliness, grief, heartbreak, fear and anxiety, anger, stress,
joy, pride and relief, gratitude, affection, reaching out), not from the evaluation set.
"""

from __future__ import annotations


def _es_adj(*stems: str) -> list[str]:
    """Spanish adjectives/participles in -o: gender, number and the -isimo superlative."""
    return [stem + end for stem in stems
            for end in ("o", "a", "os", "as", "isimo", "isima", "isimos", "isimas")]


def _es_ar(*stems: str) -> list[str]:
    """Common forms of Spanish -ar verbs (present, past, imperfect, gerund, participle)."""
    ends = ("ar", "o", "as", "a", "amos", "an", "e", "es", "en", "aba", "abas", "aban",
            "ando", "ado", "ada", "ados", "adas", "aste", "aron", "are", "aria", "ara")
    return [stem + end for stem in stems for end in ends]


def _es_er(*stems: str) -> list[str]:
    """Common forms of Spanish -er/-ir verbs."""
    ends = ("er", "ir", "o", "es", "e", "emos", "imos", "en", "i", "io", "ia", "ias", "ian",
            "iendo", "ido", "ida", "idos", "iste", "ieron")
    return [stem + end for stem in stems for end in ends]


def _en(*words: str) -> list[str]:
    """English words with -s, -ed, -ing, -ly, -ness variants where they are words."""
    out = []
    for word in words:
        out.append(word)
        if word.endswith("e"):
            out += [word + "s", word + "d", word[:-1] + "ing", word + "ly"]
        elif word.endswith("y"):
            out += [word[:-1] + "ies", word[:-1] + "ied", word + "ing", word[:-1] + "ily",
                    word[:-1] + "iness"]
        else:
            out += [word + "s", word + "ed", word + "ing", word + "ly", word + "ness"]
    return out


# -- feeling words: an emotional state or reaction ----------------------------------------
FEELING_WORDS_ES = [
    *_es_adj("cansad", "agotad", "preocupad", "deprimid", "frustrad", "ansios", "nervios",
             "asustad", "aterrad", "angustiad", "agobiad", "estresad", "enfadad", "enojad",
             "cabread", "emocionad", "destrozad", "hundid", "desesperad", "decepcionad",
             "desilusionad", "avergonzad", "abrumad", "apenad", "dolid", "herid", "amargad",
             "desanimad", "desmotivad", "bajonead", "quemad", "reventad", "rayad", "agüitad",
             "aguitad", "ilusionad", "orgullos", "content", "encantad", "aliviad", "agradecid",
             "enamorad", "celos", "furios", "molest", "confundid", "perdid", "vaci", "roto",
             "rot", "sol", "abandonad", "rechazad", "ignorad", "traicionad", "humillad",
             "arrepentid", "culpable", "inutil", "solitari", "desgraciad", "jodid", "fastidiad",
             "afligid", "acongojad", "atormentad", "inquiet", "intranquil", "tens", "bloquead",
             "harto", "hart", "pres", "atrapad", "encerrad", "amad", "querid", "feliz",
             "tranquil", "calmad", "relajad", "motivad", "animad", "sorprendid", "asombrad"),
    "triste", "tristes", "tristisimo", "tristisima", "tristeza", "feliz", "felices",
    "felicidad", "alegre", "alegres", "alegria", "soledad", "depresion", "depre", "ansiedad",
    "angustia", "agobio", "estres", "miedo", "miedos", "panico", "terror", "pena", "penas",
    "dolor", "sufrimiento", "rabia", "ira", "impotencia", "frustracion", "verguenza", "culpa",
    "nostalgia", "anoranza", "morrina", "melancolia", "desamor", "desamparo", "vacio",
    "tristeza", "ilusion", "orgullo", "alivio", "gratitud", "carino", "amor", "desesperacion",
    "fatal", "horrible", "fracaso", "fracasado", "fracasada", "bajon", "bajona", "agobiante",
    "insoportable", "desgarrador", "emocion", "emociones", "sentimiento", "sentimientos",
    "nervios", "insomnio", "duelo", "luto", "lagrimas", "lagrima", "sollozo", "sollozos",
    "lloro", "llore", "lloro", "llorar", "llorando", "lloraba", "llorado", "lloras",
    *_es_ar("llor", "preocup", "agobi", "angusti", "extran", "anor", "estres", "enfad",
            "enoj", "frustr", "decepcion", "agradec", "emocion", "ilusion", "desesper",
            "deprim", "asust", "aterr", "abrum", "apen"),
    *_es_er("sufr", "dol", "entristec", "deprim"),
    "abrazo", "abrazos", "abrazar", "abrazara", "abrace", "consuelo", "nadie",
    *_es_adj("achicopalad", "apachurrad", "bajonead", "embolad", "podrid", "cabread",
             "mosquead", "chof", "pachuch", "molid", "triston", "desconsolad", "atormentad",
             "ahogad", "atrapad", "bloquead", "asfixiad", "acomplejad", "insegur", "fe",
             "gord", "despedid", "echad", "deprimid", "encerrad", "rechazad", "dolid",
             "ilusionad", "entusiasmad", "emocionad", "agradecid", "bendecid", "afortunad",
             "orgullos", "nervios", "inquiet", "alterad", "irritad", "amargad", "resentid",
             "celos", "envidios", "avergonzad", "culpable", "arrepentid", "confundid"),
    "presentimiento", "mal rollo", "agobio", "malestar", "pesadilla", "pesadillas",
    "desanimo", "desaliento", "desconsuelo", "pesar", "apatia", "decepcion", "desengano",
    "abandono", "rechazo", "inseguridad", "complejo", "complejos", "celos", "envidia",
    "resentimiento", "remordimiento", "bajoneo", "plof", "fatal",
    "felicisimo", "felicisima", "genial", "increible", "maravilloso", "maravillosa",
    "emocionante", "guay", "chido", "chida", "bacan", "flipando", "encantada",
    "encantado", "entusiasmo", "esperanza", "gratitud", "paz", "calma", "aburrido",
    "aburrida", "aburrimiento",
    "duele", "duelen", "dolio", "odio", "odie", "odiar", "extrano", "extranamos",
    "quiero", "amo", "adoro", "siento", "sentia", "senti",
]
FEELING_WORDS_EN = [
    "sad", "sadder", "saddest", "sadness", "unhappy", "unhappiness", "happy", "happier",
    "happiest", "happiness", "lonely", "loneliness", "lonelier", "alone", "depressed",
    "depression", "depressing", "down", "blue", "miserable", "heartbroken", "heartbreak",
    "heartbreaking", "crushed", "devastated", "gutted", "shattered", "broken", "numb",
    "empty", "emptiness", "hopeless", "hopelessness", "helpless", "worthless", "useless",
    "exhausted", "exhaustion", "tired", "drained", "burnt", "burned", "burnout", "weary",
    "worn", "overwhelmed", "overwhelming", "stressed", "stress", "stressful", "anxious",
    "anxiety", "nervous", "nervousness", "scared", "afraid", "terrified", "frightened",
    "fear", "fears", "panic", "panicking", "panicked", "dread", "dreading", "worried",
    "worry", "worries", "worrying", "upset", "hurt", "hurts", "hurting", "pain", "painful",
    "angry", "anger", "furious", "mad", "pissed", "annoyed", "frustrated", "frustrating",
    "frustration", "fed", "resentful", "bitter", "jealous", "ashamed", "embarrassed",
    "humiliated", "guilty", "guilt", "shame", "regret", "regrets", "lost", "confused",
    "insecure", "rejected", "abandoned", "betrayed", "ignored", "unloved", "unwanted",
    "invisible", "grief", "grieving", "mourning", "cry", "cries", "crying", "cried",
    "tears", "sobbing", "sob", "glad", "joy", "joyful", "thrilled", "excited", "excitement",
    "ecstatic", "elated", "delighted", "overjoyed", "grateful", "thankful", "proud",
    "relieved", "relief", "amazing", "wonderful", "blessed", "stoked", "pumped", "psyched",
    "bummed", "homesick", "heartsick", "lovesick", "moody", "meh", "awful", "terrible",
    "horrible", "rough", "shitty", "crappy", "sucks", "hate", "hated", "hating", "miss",
    "missed", "missing", "misses", "love", "loved", "loving", "adore", "feel", "feels",
    "feeling", "feelings", "felt", "emotional", "teary", "tearful", "hug", "hugs",
    "spiraling", "spiralling", "freaking", "struggling", "suffering", "hurting", "failure",
    "loser", "despair", "sorrow", "heartache", "nightmare", "scary", "lonesome", "gloomy",
    "calm", "calmer", "peaceful", "hopeful", "happier", "content", "cheer", "cheered",
    "comforted", "comfort", "nobody", "lonely", "anymore", "pointless", "worthless",
    "lousy", "crap", "blah", "stuck", "trapped", "suffocating", "mess",
    "wreck", "shook", "shaken", "choked", "hollow", "defeated", "disappointed",
    "disappointment", "discouraged", "demotivated", "unmotivated", "restless", "uneasy",
    "tense", "jittery", "edgy", "paranoid", "self-conscious", "ugly", "stupid", "dumb",
    "idiot", "pathetic", "unlovable", "bullied", "excluded", "ghosted", "dumped",
    "betrayal", "lied", "insulted", "offended", "irritated", "livid", "outraged", "bitter",
    "grumpy", "cranky", "moody", "sulking", "bored", "boredom", "thrilled", "giddy",
    "stoked", "grateful", "fortunate", "lucky", "blessed", "hopeful", "optimistic",
    "inspired", "peace", "content", "fulfilled", "euphoric", "overjoyed", "proudest",
    "awesome", "fantastic", "incredible", "yay", "woohoo", "omg", "wow",
]

# -- life events that carry the emotion without naming it ---------------------------------
EVENT_WORDS_ES = [
    *_es_er("mur", "falleci", "fallec"), "murio", "murieron", "muerte", "muerto", "muerta",
    "fallecio", "fallecimiento", "funeral", "entierro", "velorio", "tanatorio", "enterramos",
    "enterrar", "cementerio", "incinerar", "divorcio", "separacion", "ruptura", "cuernos",
    "engano", "engaño", "infiel", "despidieron", "despido", "paro", "embarazada", "embarazo",
    "aborto", "bebe", "boda", "casamos", "beca", "aprobe", "suspendi", "suspendieron",
    "hospital", "cancer", "quimio", "operacion", "accidente", "mudanza",
    "cumpleanos", "ex", "novio", "novia", "pareja", "marido", "esposa", "esposo", "abuela",
    "abuelo", "abuelita", "abuelito", "mama", "papa", "madre", "padre", "hermano",
    "hermana", "hijo", "hija", "hijos", "despedir", "despedido", "despedida", "echaron",
    "infarto", "ictus", "alzheimer", "demencia", "enfermedad", "enfermo", "enferma",
    "operacion", "cirugia", "urgencias", "uci", "jubilacion", "desahucio", "deudas",
    "perro", "perrita", "perrito", "gato", "gatito",
    "gata", "mascota", "amiga", "amigo", "amigos", "amigas",
]
EVENT_WORDS_EN = [
    "died", "dead", "death", "passed", "funeral", "buried", "burial", "grave", "cemetery",
    "miscarriage", "miscarried", "divorce", "divorced", "breakup", "dumped", "cheated",
    "cheating", "affair", "fired", "laid", "pregnant", "baby", "wedding", "engaged",
    "proposed", "hospital", "cancer", "diagnosis", "diagnosed", "chemo", "surgery",
    "accident", "ex", "boyfriend", "girlfriend", "husband", "wife", "partner", "grandma",
    "grandpa", "grandmother", "grandfather", "mom", "mum", "mother", "dad", "father",
    "brother", "sister", "son", "daughter", "kids", "dog", "puppy", "cat", "kitten", "pet",
    "friend", "friends", "bestie", "layoff", "laid-off", "unemployed", "sick", "illness",
    "stroke", "heart attack", "dementia", "alzheimer's", "alzheimers", "icu",
    "eviction", "evicted", "debt", "bankrupt", "adopted", "graduated", "graduation",
    "promoted", "promotion", "anniversary", "engagement",
]

# -- first-person feeling constructions, idioms and slang (multi-word, matched as phrases)
FEELING_PHRASES_ES = [
    "me siento", "me sentia", "me senti", "siento que", "me encuentro", "estoy muy",
    "estoy tan", "estoy super", "estoy re", "estoy de", "estoy que", "estoy hecho",
    "estoy hecha", "estoy fatal", "estoy mal", "estoy bien mal", "ando muy", "ando bien",
    "ando con", "ando mal", "echo de menos", "echo mucho de menos", "lo echo de menos",
    "la echo de menos", "te echo de menos", "los echo de menos", "te extrano", "me duele",
    "me dueles", "tengo miedo", "me da miedo", "me da panico", "me da rabia", "me da pena",
    "me da verguenza", "no puedo mas", "no doy mas", "no aguanto", "no lo soporto",
    "no paro de llorar", "no puedo parar de llorar", "no puedo dejar de", "no puedo dormir",
    "no tengo ganas", "sin ganas", "no le importo", "no les importo", "no me quiere",
    "no me entiende", "nadie me entiende", "nadie me quiere", "nadie me escucha",
    "nadie me escribe", "no tengo a nadie", "no tengo amigos", "estoy sola", "estoy solo",
    "me siento sola", "me siento solo", "me quede sola", "me quede solo", "me dejo",
    "me dejaron", "me ha dejado", "me han dejado", "me puso los cuernos", "me enganaba",
    "corazon roto", "roto el corazon", "rompio el corazon", "roto por dentro",
    "se me cae el mundo", "el mundo encima", "nudo en la garganta", "nudo en el estomago",
    "corazon en un puno", "con el alma en vilo", "alma en vilo", "por los suelos",
    "hecho polvo", "hecha polvo", "hecho mierda", "en una nube", "en las nubes",
    "no quepo en mi", "cero a la izquierda", "que bajon", "de bajon", "de bajona",
    "mala onda", "que mala suerte", "que pena", "que alegria", "que ilusion", "que alivio",
    "que impotencia", "que rabia", "que verguenza", "que horror", "que dia",
    "hasta las narices", "hasta el gorro", "hasta la coronilla", "echo humo",
    "al limite", "estoy al limite", "toco fondo", "tocando fondo",
    "me siento culpable", "me siento un", "me siento una", "me siento como",
    "me va a mil", "estoy que no", "me tiene mal", "me tiene fatal", "me tiene harto",
    "me tiene harta", "necesito desahogarme", "necesito hablar", "puedes hablar conmigo",
    "hablar conmigo", "hazme compania", "me haces compania", "me escuchas", "escuchame",
    "no se que hacer", "no se como seguir", "no se ni como", "ya no se", "gracias por escucharme",
    "gracias por estar", "gracias por todo", "mil gracias", "muchas gracias", "te lo agradezco",
    "te agradezco", "te quiero", "te amo", "eres un sol", "me alegras", "me alegra",
    "me encanta hablar", "un abrazo", "lo siento mucho",
    "estoy orgulloso", "estoy orgullosa", "no me lo puedo creer", "no me lo creo",
    "se fue", "se ha ido", "ya no esta", "estoy harto", "estoy harta",
    "me pesa", "me mata", "me esta matando", "sigo enamorado", "sigo enamorada",
    "no lo supero", "no supero", "ganas de nada", "nada tiene sentido", "no tiene sentido",
    "sin sentido", "ya no puedo", "ya no quiero", "no quiero levantarme", "no quiero ver a nadie",
    "no tengo fuerzas", "mal presentimiento", "de capa caida", "me come la cabeza",
    "comiendo la cabeza", "dando vueltas", "le doy vueltas", "no me lo quito de la cabeza",
    "no me lo saco de la cabeza", "me ralla", "me raya", "me agobia", "me pone triste",
    "me pone nervioso", "me pone nerviosa", "me tiene preocupado", "me tiene preocupada",
    "me tiene loco", "me tiene loca", "me pone de mal humor", "de mal humor", "de mala leche",
    "de malas", "ando de malas", "estoy de malas", "voy tirando", "ni fu ni fa",
    "que guay", "que emocion", "me hace ilusion", "me hace mucha ilusion", "que ganas",
    "me muero de ganas", "me muero de miedo", "muerto de miedo", "muerta de miedo",
    "me subo por las paredes", "estoy que trino", "que trino", "hecho un lio", "hecha un lio",
    "hecho un trapo", "hecha un trapo", "hecho bolsa", "hecha bolsa", "pal pico",
    "pa la cagada", "para la mierda", "como el orto", "me siento fatal", "me siento mal",
    "me siento bien", "me siento mejor", "me siento peor", "me siento fenomenal",
    "me siento genial", "me siento inutil", "me siento insegura", "me siento inseguro",
    "estoy feliz", "estoy triste", "estoy contento", "estoy contenta", "estoy enamorado",
    "estoy enamorada", "me ha dejado", "me han despedido", "me echaron", "me despidieron",
    "me acaban de", "lo perdi", "la perdi", "los perdi", "perdi a", "se murio", "ha muerto",
    "ha fallecido", "me caso", "nos casamos", "voy a ser mama", "voy a ser papa",
    "estoy embarazada", "me dieron el alta", "me dieron la noticia", "mala noticia",
    "malas noticias", "buena noticia", "buenas noticias", "me falta", "me haces falta",
    "me hace falta", "no me habla", "no me hablan", "me ignoran", "me ignora",
    "se burlan de mi", "se rien de mi", "me siento fuera", "fuera de lugar",
    "no encajo", "no valgo", "no sirvo para nada", "soy un desastre", "soy una desastre",
    "me odio", "me doy asco", "me quiero morir", "no quiero vivir", "ganas de llorar",
    "con ganas de llorar", "me dan ganas de llorar", "me puse a llorar", "rompi a llorar",
    "me falta el aire", "me oprime el pecho", "presion en el pecho",
    "me tiemblan", "lo necesitaba", "me hacia falta", "me cuesta", "me cuesta mucho",
    "estoy cansado de", "estoy cansada de", "lo extrano", "la extrano", "los extrano",
]
FEELING_PHRASES_EN = [
    "i feel", "i'm feeling", "i am feeling", "im feeling", "feel like", "feeling like",
    "i felt", "i've been feeling", "i'm so", "i am so", "im so", "i'm really", "i'm just",
    "i'm completely", "i'm totally", "i'm kinda", "i'm lowkey", "i'm not doing",
    "not doing great", "not doing well", "not okay", "not ok", "i miss", "i really miss",
    "miss you", "miss him", "miss her", "miss them", "i lost", "we lost", "passed away",
    "put down", "put him down", "put her down", "broke up", "broke my heart",
    "broken heart", "my heart", "heart is", "in pieces", "falling apart", "fall apart",
    "end of my rope", "wits' end", "wits end", "at my limit", "on cloud nine",
    "over the moon", "butterflies in my stomach", "fish out of water", "walls are closing",
    "walking on eggshells", "on edge", "a nervous wreck", "nervous wreck", "worried sick",
    "sick and tired", "fed up", "burnt out", "burned out", "running on empty", "drowning",
    "can't stop crying", "cant stop crying", "can't stop thinking", "can't stop overthinking",
    "can't sleep", "cant sleep", "can't breathe", "can't take", "can't do this",
    "can't handle", "can't cope", "i give up", "nobody understands", "no one understands",
    "nobody cares", "no one cares", "nobody listens", "nobody texts", "no one texts",
    "nobody gets me", "nobody loves", "no one loves", "don't want to be alone",
    "dont want to be alone", "all alone", "by myself", "left behind", "left me",
    "she left", "he left", "cheated on me", "i hate myself", "hate my life",
    "i'm scared", "i'm afraid", "i'm worried", "i'm terrified", "i'm freaking out",
    "freaking out", "panic attack", "anxiety attack", "i'm proud", "proud of myself",
    "what a relief", "best day", "worst day", "i got the job", "got the job",
    "thank you so much", "thanks so much",
    "thanks for being", "thank you for being", "thanks for listening", "thank you for listening",
    "thanks for everything", "means a lot", "means so much", "it means the world",
    "really helped", "you helped", "you've been so", "i appreciate you", "appreciate you",
    "i love talking", "love talking to you", "cheer me up", "you're the best",
    "i need someone", "need someone to talk", "someone to talk to",
    "who else to talk", "talk to me", "talk with me", "can i vent", "need to vent",
    "i need to talk", "need a hug", "just hug me", "hug me", "i don't know what to do",
    "dont know what to do", "i don't know how", "what's wrong with me", "whats wrong with me",
    "let everyone down", "let you down", "i failed", "i'm a failure", "i'm such a",
    "getting to me", "get to me", "nothing matters", "no point", "what's the point",
    "whats the point", "don't want to do", "dont want to do", "do anything anymore",
    "don't want to get up", "can't get out of bed", "no energy", "no motivation",
    "so tired of", "tired of everything", "feeling low", "feeling down", "feel low",
    "feel down", "down in the dumps", "in a funk", "rough patch", 
    "heavy heart", "lump in my throat", "choked up", "tear up", "teared up", "welled up",
    "bad feeling", "gut feeling", "something bad", "can't shake", "shake this feeling",
    "pit in my stomach", "sinking feeling", "on pins and needles", "at the end of my tether",
    "hanging by a thread", "barely holding", "holding it together", "keep it together",
    "falling to pieces", "world is ending", "world fell apart", "over it", "so over",
    "had enough", "had it", "i've had it", "last straw", "pissed off", "ticked off",
    "lost my job", "got fired", "got laid off", "been let go", "let go", "got dumped",
    "got ghosted", "behind my back", "stabbed me", "lied to me", "used me", "left out",
    "no friends", "don't have friends", "don't have anyone", "have no one", "no one to talk",
    "nobody likes me", "no one likes me", "hate my body", "hate the way", "so ugly",
    "so stupid", "so dumb", "i'm useless", "i'm worthless", "i'm pathetic", "want to disappear",
    "want to die", "kill myself", "end it all", "made my day", "make my day", "you made",
    "you're amazing", "you are amazing", "love you", "in love", "head over heels",
    "couldn't be happier", "on top of the world", "walking on air", "best news",
    "great news", "good news", "bad news", "terrible news", "so in love", "tears of joy",
    "happy tears", "so relieved", "i passed",
    "passed my", "got in", "got accepted", "got engaged", "getting married", "getting divorced",
    "moved out", "passed in", "passed last", "passed this", "my condolences",
    "chest gets tight", "chest is tight", "tight chest",
    "heart is racing", "heart racing", "stomach in knots", "knot in my stomach",
    "can't stop shaking", "shaking", "needed that", "needed this", "so done", "i'm done",
    "this sucks", "it sucks",
    "ugh", "ngl", "lowkey", "highkey", "rn", "tbh", "lol", "kinda meh", "not great",
    "rough day", "rough week", "hard day", "hard time", "tough day", "tough time",
    "bad day", "long day", "what a day", "a lot going on", "so much going on",
    "on my plate", "too much", "crying", "in tears", "broke down", "break down",
    "so happy", "so sad", "so tired",
    "so lonely", "so stressed", "so scared", "so excited", "so proud", "so grateful",
]

GRATITUDE = [
    "gracias", "agradezco", "agradecida", "agradecido", "agradecimiento", "thanks", "thank",
    "thx", "ty", "appreciate", "appreciated", "grateful", "thankful",
]
#: The user speaks of themselves.
FIRST_PERSON = [
    "i", "i'm", "im", "i've", "ive", "i'd", "i'll", "me", "my", "myself", "mine", "we",
    "we're", "our", "us", "yo", "mi", "mis", "conmigo", "estoy", "soy", "tengo", "siento",
    "ando", "llevo", "puedo", "quiero", "necesito", "echo", "extrano", "se", "estaba",
    "tenia", "fui", "perdi", "encontre", "escuche", "lloro", "lloré", "lloré", "me",
    "nos", "nuestro", "nuestra", "estamos",
]
#: The user speaks to the assistant as company (not as a tool).
SECOND_PERSON = [
    "you", "you're", "youre", "your", "contigo", "te", "tu", "eres", "estas", "ti",
]
INTENSIFIERS = [
    "muy", "mucho", "muchisimo", "muchisima", "tan", "tanto", "demasiado", "super", "re",
    "bien", "so", "really", "very", "too", "totally", "completely", "literally", "honestly",
    "de verdad", "seriously", "such",
]

# -- against: a task, a question about the world, technical or meta-language content ------
TASK_WORDS = [
    # imperative or request verbs that ask the assistant to produce something
    "escribe", "escribeme", "redacta", "traduce", "traducir", "traduccion", "explica",
    "explicame", "explicar", "dame", "dime", "haz", "hazme", "crea", "genera", "convierte",
    "resume", "resumen", "corrige", "ordena", "organiza", "recomiendame", "recomienda",
    "sugiere", "sugiereme", "describe", "calcula", "resuelve", "compara", "enumera", "lista",
    "planifica", "disena", "analiza", "analisis", "ayudame", "programa", "configura",
    "write", "translate", "translation", "explain", "give", "tell", "make", "create",
    "generate", "convert", "summarize", "summarise", "summary", "correct", "fix", "sort",
    "organize", "recommend", "suggest", "describe", "calculate", "solve", "compare", "list",
    "plan", "design", "analyze", "analyse", "draft", "define", "proofread", "rewrite",
    "edit", "format", "debug", "install", "configure", "implement", "build", "rank",
    "identify", "caption", "transcribe", "transcribir",
    # meta-language: talking about words, not feelings
    "significa", "significado", "sinonimo", "sinonimos", "frase", "frases", "expresion",
    "palabra", "se dice", "how do you say", "mean", "means", "meaning", "synonym",
    "synonyms", "phrase", "word", "grammar", "gramatica", "origin", "origen", "poema",
    "poem", "cancion", "song", "story", "cuento", "historia", "letter", "carta", "mensaje",
    "message", "tarjeta", "card", "toast", "brindis", "essay", "ensayo", "pelicula",
    "peliculas", "movie", "movies", "libro", "libros", "book", "books", "novela", "novel",
    "theme", "tema", "character", "personaje",
    # informational framing of an emotion word
    "sintoma", "sintomas", "symptom", "symptoms", "etapas", "stages", "diferencia",
    "difference", "psicologia", "psychology", "hormona", "hormonas", "hormone", "hormones",
    "neurotransmitters", "neurotransmisores", "trastorno", "disorder", "causes", "causas",
    "sindrome", "syndrome", "segun", "according", "study", "estudio", "research", "tips",
    "consejos", "ideas", "recipe", "receta", "itinerary", "itinerario",
]
QUESTION_WORDS = [
    "que", "como", "cual", "cuales", "cuanto", "cuantos", "cuanta", "cuantas", "donde",
    "cuando", "quien", "quienes", "por que", "para que", "what", "what's", "whats", "how",
    "which", "when", "where", "who", "why", "whose", "is", "are", "does", "do", "can",
    "could", "should", "will", "el", "la", "es",
]
TECHNICAL_WORDS = [
    "error", "errors", "exception", "traceback", "bug", "function", "funcion", "codigo",
    "code", "script", "python", "javascript", "java", "rust", "sql", "query", "consulta",
    "api", "server", "servidor", "kernel", "docker", "kubernetes", "kubectl", "git",
    "github", "commit", "branch", "regex", "json", "csv", "html", "css", "react", "linux",
    "ubuntu", "windows", "macos", "bash", "nginx", "postgres", "postgresql", "mysql",
    "database", "base de datos", "algoritmo", "algorithm", "complejidad", "complexity",
    "ecuacion", "equation", "derivada", "derivative", "integral", "matriz", "matrix",
    "compilar", "compile", "compiler", "deploy", "install", "instalar", "configurar",
    "config", "variable", "variables", "puntero", "pointer", "segfault", "thread",
    "process", "http", "tcp", "udp", "ssh", "wifi", "wi", "cpu", "ram", "gpu", "pandas",
    "numpy", "flask", "django", "node", "npm", "pip", "terminal", "dockerfile", "loop",
    "useeffect", "array", "lista", "string", "cadena", "integer", "float", "byte", "bytes",
    "gigabyte", "megabyte", "binario", "binary", "hex", "calculo", "formula", "teorema",
    "theorem", "percent", "porcentaje",
]
#: Negators: "not sad" / "no estoy triste" still talk about feelings, so a negated feeling
#: word counts half, not zero; a negated positive word ("not great") reads as a low mood.
NEGATORS = ["no", "not", "never", "nunca", "jamas", "ni", "isn't", "wasn't", "don't",
            "dont", "didn't", "can't", "cant", "haven't", "without", "sin"]
POSITIVE_WORDS = ["great", "good", "well", "okay", "ok", "fine", "happy", "feliz", "bien",
                  "alright"]
