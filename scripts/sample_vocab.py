"""The words the sample-data generator builds messages from: names, companies, cities, templates.

Kept apart from the generator's logic; edits here change the generated files (rerun make_sample_data.py).
"""

from __future__ import annotations

import re

# --------------------------------------------------------------------------
# Data lists
# --------------------------------------------------------------------------

# fmt: off
FEMALE_FIRST = [
    "Maria", "Aisha", "Yuki", "Priya", "Olga", "Fatima", "Chloe", "Ingrid", "Mei",
    "Amara", "Sofia", "Hana", "Leila", "Nadia", "Elena", "Camille", "Astrid",
    "Ji-woo", "Zainab", "Lucia", "Freya", "Ana", "Chiara", "Keiko", "Thandiwe",
    "Ngozi", "Isabel", "Noor", "Sakura", "Marta", "Agnieszka", "Katarina", "Esther",
    "Rosa", "Dilnoza", "Anika", "Emma", "Grace", "Olivia", "Hannah", "Mariam",
    "Ayumi", "Lina", "Selin", "Defne", "Tamar", "Ruth", "Siobhan", "Niamh", "Aroha",
    "Malia", "Zoë", "Inès", "Paula", "Beatriz", "Valentina", "Daniela", "Xiomara",
    "Lerato", "Wanjiru", "Adaeze", "Meera", "Divya", "Farah", "Yasmin", "Mirela",
    "Eszter", "Jana", "Petra", "Sanna", "Linnea", "Aoife", "Kaia", "Tala", "Linh",
    "Dewi", "Leilani", "Nomvula",
]
MALE_FIRST = [
    "Lucas", "Kenji", "Arjun", "Mohammed", "Omar", "Tomás", "Ivan", "Liam", "Wei",
    "Hiroshi", "Kwame", "Chidi", "Mateo", "Diego", "Rafael", "Pierre", "Jonas",
    "Lars", "Mikael", "Sven", "Erik", "Piotr", "Marek", "Dmitri", "Andrei", "Yusuf",
    "Emre", "Mehmet", "Ravi", "Sanjay", "Vikram", "Tariq", "Hamza", "Karim", "Samir",
    "Daniel", "Noah", "James", "Ethan", "Samuel", "David", "Thomas", "Felix",
    "Henrik", "Matteo", "Giovanni", "Luca", "Paolo", "Javier", "Carlos", "Andrés",
    "Joaquín", "Tiago", "João", "Bruno", "Kofi", "Tendai", "Sipho", "Baraka", "Jomo",
    "Minh", "Duc", "Somchai", "Arif", "Budi", "Rizal", "Jae-won", "Min-jun",
    "Haruto", "Sota", "Tane", "Keanu", "Ilya", "Nikolai", "Ahmad", "Reza",
    "Dariusz", "Finn", "Oisin", "Callum", "Ewan", "Bjorn",
]
LAST_NAMES = [
    "Lopez", "Okafor", "Müller", "Nguyen", "Kim", "Park", "Chen", "Wang", "Li",
    "Singh", "Patel", "Khan", "Haddad", "Rahman", "Ahmed", "Hassan", "Silva",
    "Oliveira", "Costa", "Pereira", "Fernandes", "García", "Martínez", "Rodríguez",
    "Hernández", "Gómez", "Díaz", "Romero", "Rossi", "Bianchi", "Russo", "Ferrari",
    "Esposito", "Conti", "Moreau", "Dubois", "Laurent", "Lefebvre", "Girard",
    "Schmidt", "Schneider", "Fischer", "Weber", "Wagner", "Becker", "Hoffmann",
    "Jansen", "de Vries", "van Dijk", "Bakker", "Visser", "Peeters", "Janssens",
    "Nielsen", "Hansen", "Johansson", "Lindqvist", "Andersson", "Berg", "Virtanen",
    "Korhonen", "Novak", "Horvat", "Kowalski", "Nowak", "Kovacs", "Nagy", "Popescu",
    "Ionescu", "Petrov", "Volkov", "Papadopoulos", "Georgiou", "Yilmaz", "Kaya",
    "Demir", "Celik", "Cohen", "Levi", "Mizrahi", "Friedman", "Mensah", "Owusu",
    "Boateng", "Adeyemi", "Okonkwo", "Eze", "Mwangi", "Kamau", "Otieno", "Dlamini",
    "Nkosi", "Mokoena", "Banda", "Phiri", "Tesfaye", "Bekele", "Haile", "Suzuki",
    "Sato", "Takahashi", "Watanabe", "Yamamoto", "Nakamura", "Kobayashi", "Ito",
    "Choi", "Jung", "Kang", "Cho", "Tran", "Pham", "Hoang", "Vu", "Santoso",
    "Wijaya", "Hidayat", "Reyes", "Bautista", "Mendoza", "Aquino", "Iyer", "Reddy",
    "Gupta", "Mehta", "Joshi", "Rao", "Das", "Bose", "Chowdhury", "Siddiqui",
    "Qureshi", "Malik", "Farouk", "Nasser", "Karimi", "Hosseini", "O'Brien",
    "Murphy", "Kelly", "Walsh", "MacLeod", "Campbell", "Thompson", "Walker",
    "Robinson", "Clarke", "Hughes", "Evans", "Davies", "Taylor", "Ngata", "Tuilagi",
    "Kahale", "Quispe", "Mamani", "Castillo", "Vargas", "Rojas", "Morales",
]
COMPANIES = [
    "Brightwave", "Northpeak Labs", "Quillstone", "Tidewell Systems", "Orbital Fern",
    "Kestrel Analytics", "Lumenhaus", "Crestline Foods", "Bluecairn", "Halvard & Co",
    "Mossgrove Studio", "Pinecrest Robotics", "Verdigris Health", "Saltmarsh Media",
    "Ironleaf", "Copperfold Logistics", "Silverkite", "Amberfold", "Nimbus Forge",
    "Redwater Energy", "Glasshouse Digital", "Hollowbrook", "Tessera Bio",
    "Marlowe Partners", "Ferrovia Rail", "Solstice Labs", "Quantara",
    "Windmere Capital", "Driftwood Design", "Starling Freight", "Zephyra",
    "Obsidian Row", "Larkspur Learning", "Greyfen", "Velora", "Aurelio Foods",
    "Cobaltique", "Meridian Loom", "Pebblepath", "Kinsale Robotics",
    "Thornbury Legal", "Ashgrove Insurance", "Fjordline Tech", "Sunhaven Solar",
    "Coralis", "Tangerine Loop", "Vantablue", "Orchard & Pike", "Ridgeback Security",
    "Polaris Mill", "Sagebrush Analytics", "Helixa", "Brambleworks",
    "Cinderlight Games", "Oakhollow Press", "Lanternfish", "Bluefin Ventures",
    "Etherway", "Harborlight", "Juniper Slate", "Mistral Dynamics", "Nettlefield",
    "Opaline", "Parchment & Ink", "Quarrystone", "Rosewater Travel", "Skylark Aero",
    "Umbra Labs", "Vireo Systems", "Wrenfield", "Yarrow Health", "Alderbank",
    "Bitterroot Coffee", "Canopy Circuit", "Duskfall Media", "Emberline",
    "Foxglove Biotech", "Gullwing Motors", "Heathervale", "Inkwell Analytics",
    "Jadeport", "Kelpie Logistics", "Lodestar Maps", "Moonrake", "Pallas Robotics",
    "Quenby", "Riverlight", "Seabright Labs", "Trillium Data", "Upland Forge",
    "Vesper Audio", "Willowmere", "Xylo Systems", "Yellowfin Bank", "Zirconia",
]
CITIES = [
    "Valencia", "Lisbon", "Porto", "Madrid", "Barcelona", "Seville", "Málaga",
    "Paris", "Lyon", "Marseille", "Bordeaux", "Brussels", "Antwerp", "Amsterdam",
    "Rotterdam", "Utrecht", "Berlin", "Munich", "Hamburg", "Cologne", "Leipzig",
    "Zürich", "Geneva", "Vienna", "Prague", "Kraków", "Warsaw", "Budapest",
    "Bucharest", "Athens", "Istanbul", "Ankara", "Copenhagen", "Stockholm", "Oslo",
    "Helsinki", "Tallinn", "Riga", "Vilnius", "Reykjavík", "Dublin", "Edinburgh",
    "Glasgow", "Manchester", "Bristol", "London", "Leeds", "Milan", "Turin",
    "Bologna", "Naples", "Rome", "Tel Aviv", "Cairo", "Casablanca", "Lagos", "Accra",
    "Nairobi", "Kigali", "Addis Ababa", "Johannesburg", "Cape Town", "Dubai", "Doha",
    "Karachi", "Mumbai", "Bangalore", "Chennai", "Hyderabad", "Dhaka", "Colombo",
    "Kathmandu", "Bangkok", "Hanoi", "Ho Chi Minh City", "Singapore",
    "Kuala Lumpur", "Jakarta", "Manila", "Taipei", "Seoul", "Busan", "Tokyo",
    "Osaka", "Kyoto", "Shanghai", "Shenzhen", "Hong Kong", "Melbourne", "Brisbane",
    "Perth", "Auckland", "Wellington", "Vancouver", "Toronto", "Montreal", "Calgary",
    "Seattle", "Denver", "Chicago", "Boston", "New York", "Atlanta", "Miami",
    "Mexico City", "Guadalajara", "Bogotá", "Medellín", "Lima", "Quito",
    "Buenos Aires", "Montevideo", "São Paulo", "Rio de Janeiro", "Curitiba",
]
COMPANY_TLDS = [
    "com", "io", "org", "co.uk", "de", "fr", "es", "nl", "co", "ai", "net", "se",
    "com.au", "ca", "ch", "it", "dev", "eu",
]
PERSONAL_DOMAINS = [
    "gmail.com", "outlook.com", "proton.me", "yahoo.com", "hotmail.com",
    "icloud.com", "fastmail.com", "posteo.de", "gmx.de", "mail.com", "web.de",
    "hey.com",
]
ROLES = [
    "Product Manager", "Data Engineer", "Head of Partnerships", "CTO", "Sales Lead",
    "UX Researcher", "Account Executive", "Operations Director", "Founder",
    "Marketing Manager", "Software Engineer", "Recruiter", "Procurement Lead",
    "Project Coordinator", "VP of Engineering", "Policy Analyst", "Designer",
    "Supply Chain Manager", "Engineering Manager", "Research Scientist",
    "Customer Success Manager", "COO", "Community Manager", "Financial Controller",
]
EVENTS = [
    "the Product Forum", "Data Days", "the Climate Tech Expo", "OpenInfra Night",
    "the Founders Breakfast", "the spring career fair", "the design meetup",
    "the AI ethics roundtable", "the logistics expo", "the alumni dinner",
    "the winter hackathon", "RetailNext Live", "the health-tech mixer",
]
TOPICS = [
    "supply chain visibility", "data privacy", "carbon accounting",
    "remote onboarding", "pricing strategy", "open-source tooling",
    "customer retention", "warehouse automation", "accessibility audits",
    "cloud cost control", "clinical trial logistics", "urban mobility",
    "payments fraud", "community building", "machine translation",
]
DEPTS = [
    "partnerships", "the data team", "procurement", "developer relations",
    "customer success", "the design group", "finance", "research",
    "community programs", "talent acquisition",
]
NOISE = [
    "Thanks again for yesterday!", "Great chatting at the booth.",
    "Let's aim for Thursday at 10.", "Sorry for the slow reply, it's been a hectic week.",
    "Looking forward to the workshop.", "The slides are attached.",
    "Coffee's on me next time.", "Hope the move went smoothly.", "No rush on this.",
    "We should sync before the quarterly review.", "I'll be offline most of Friday.",
    "Happy to jump on a call whenever suits.", "Apologies for any typos.",
    "The contract draft should land by end of month.",
    "Really enjoyed the panel discussion.", "Let me know if the invoice needs changes.",
    "The team loved the demo.", "Can we push our meeting to 3pm?",
    "Parking is behind the building.", "Please keep this between us for now.",
    "It was pouring all day, so the turnout was small.",
    "The budget question is still open.", "I owe you a proper lunch.",
    "Next week is pretty packed on my side.", "Good luck with the launch!",
    "The recording should be up by Monday.", "We ran out of name badges, oops.",
    "Let's keep the first call short.", "I've shared the folder with you.",
    "Sorry, the wifi here is terrible.", "Fingers crossed for the grant decision.",
    "Hope the kids are doing well.", "Enjoy the long weekend!",
    "The agenda is still a rough draft.",
]
QUOTES = [
    "Could you confirm the budget by Friday?", "Are you free for a call next week?",
    "Did the samples arrive?", "Would you be able to review the draft?",
    "Can you share the slides from the session?", "Is the pilot still on track?",
]
BLURBS = [
    "Building calm, reliable software for busy teams.",
    "Ten years in logistics and still curious.",
    "I help nonprofits make sense of their data.", "Opinions are my own.",
    "Always happy to talk infrastructure and climate.",
    "Mentor, runner, occasional podcast guest.",
    "Turning messy processes into simple ones.", "Currently hiring, say hi!",
]
GREETINGS = ["Hi there,", "Hello,", "Good morning,", "Dear team,", "Hey,", "Hi all,"]
SIGNOFFS = ["Best", "Best regards", "Cheers", "Kind regards", "Thanks", "Warm wishes"]
ISSUES = [
    "Exports to PDF time out.", "Two-factor codes never arrive.",
    "The dashboard shows last week's numbers.", "Invoices are missing the VAT line.",
    "Cannot add new users to the workspace.", "Search ignores older files.",
]
DIETS = ["none", "vegetarian", "vegan", "gluten-free", "halal", "no nuts please"]
SOURCES = ["website footer", "webinar", "partner referral", "blog post", "trade show"]
HOBBIES = ["trail runner", "amateur baker", "chess player", "cyclist", "birdwatcher"]
FWD_OPENERS = ["Hi both,", "Hello you two,", "Connecting you as promised.", "As discussed,"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
TIMES = ["9:15", "10:30", "11am", "2pm", "3:45pm", "16:00", "17:30", "8:50"]
# fmt: on

SYSTEM_PROMPTS = [
    "Extract the contact in the user's message as JSON with the keys name, company, "
    "city, email (in that order). Use null for anything not stated. "
    "Reply with the JSON only.",
    "You turn messages into contact records. Output a single line of JSON with the "
    "keys name, company, city and email, in that order. Any field the message does "
    "not mention must be null. No explanations.",
    'Read the text and return the person\'s contact details as JSON: {"name": ..., '
    '"company": ..., "city": ..., "email": ...}. Copy values exactly as written and '
    "use null when a value is missing. Output nothing but the JSON.",
    "You are a contact-extraction assistant. Answer every message with one JSON "
    "object containing name, company, city, email (this order). Missing values are "
    "null. Do not add any other text.",
    "Return the contact described in the message as one line of JSON with keys name, "
    "company, city, email. Unknown fields are null. JSON only, no code fences.",
]
PREFIXES = [
    "Extract the contact:",
    "Parse this:",
    "JSON please:",
    "Pull the contact out of this:",
    "Contact details from this, please.",
    "extract contact",
    "Please parse the following:",
    "Can you turn this into the contact JSON?",
    "Get me the contact info:",
    "Structured contact, please:",
    "Convert to contact JSON:",
]
FOLLOWUPS = [
    "And this one:",
    "Next:",
    "Here's another:",
    "Here's another one",
    "One more:",
    "Same for this:",
    "ok next",
    "Another:",
    "Next one please.",
    "This one too:",
]
SEPARATORS = ["\n\n", "\n", " "]
OPTIONAL_FIELDS = ("company", "city", "email")
FIELD_RE = re.compile(r"\{(\w+)\}")

# A template is a sequence of parts. A part that references an optional field
# (company/city/email) whose value is null is dropped; a tuple part renders
# its first alternative whose fields are all known (or nothing).
Part = str | tuple[str, ...]
# fmt: off
TEMPLATES: list[tuple[Part, ...]] = [
    ("{noise}\n\n{signoff},\n{name}", ("\n{Role}, {company}", "\n{Role}"), "\n{city}", "\n{email}"),
    (
        "just met {name}", " from {company}", " at {event_lc}", ". {he}'s based in {city}", ", email {email}",
        ". {noise_lc}",
    ),
    (
        "Hi! I'm {name}", (", {a_role} at {company}", ", {a_role}"), ", based in {city}", ". {noise}",
        " Feel free to write to me at {email}.",
    ),
    (
        'Voicemail, {day} {time}: "Hi, this is {name}', " from {company}", ", calling from {city}",
        ". {noise}", " My email is {email}, that's {email}.", ' Thanks, bye."',
    ),
    ("{name}", (" | {Role} at {company}", " | {Role}"), " | {city}", "\n{blurb}", "\nReach me: {email}"),
    ("{name}\n{Role}", "\n{company}", "\n{city}", "\n{email}", "\n(met at {event})"),
    ("NAME: {name}", "\nCOMPANY: {company}", "\nCITY: {city}", "\nEMAIL: {email}", "\nNOTES: {noise}"),
    (
        "Fwd: introduction\n\n{fwd_open} I'd like you to meet {name}", ", who leads {dept} at {company}",
        (
            ". {He} lives in {city} and is happy to be contacted at {email}.", ". {He} lives in {city}.",
            ". {He} is happy to be contacted at {email}.", ".",
        ),
        " {noise}",
    ),
    (
        "New registration for {event}\n- Name: {name}", "\n- Organisation: {company}", "\n- City: {city}",
        "\n- Email: {email}", "\n- Dietary requirements: {diet}",
    ),
    (
        "Call log ({day}): spoke with {name}", (" ({Role}, {company})", " ({Role})"), " about {topic}.",
        " {He} is located in {city}.", " Follow up at {email}.", " {noise}",
    ),
    (
        "hey team, heads up: {name}", " from {company}", " will join the {day_lc} sync",
        ". {he}'s dialing in from {city}", ". if you need to reach {him} before then: {email}", " :wave:",
    ),
    (
        "Hey! Got the details you asked for. {name}", ", works at {company}", ", lives in {city}",
        ". Email's {email}", ". {noise}",
    ),
    (
        "I'd like to refer {name} for the {role_lc} opening.",
        (
            " {He} currently works at {company} and is based in {city}.",
            " {He} currently works at {company}.", " {He} is based in {city}.",
        ),
        " You can contact {him} at {email}.", " {noise}",
    ),
    (
        "Automatic reply: thanks for your message. I'm away until {day} and will answer when I'm back.",
        "\n\n{name}",
        ("\n{Role}, {company}", "\n{Role}"), "\n{city} office", "\n{email}",
    ),
    (
        "Invitation: {Topic}, {day} {time}\nOrganizer: {name}", " <{email}>",
        (
            "\nLocation: {company} office, {city}", "\nLocation: {company} office", "\nLocation: {city}",
            "\nLocation: video call",
        ),
        "\nJoin by video if you can't make it in person.",
    ),
    (
        "Press inquiry\n\nHello, my name is {name}",
        (" and I write for {company}", " and I'm a freelance journalist"),
        ". I'm working on a piece about {topic} and would love a quick comment.",
        " I'm based in {city}, but happy to talk by video.", " Best way to reach me is {email}.",
    ),
    ("Lead captured at {event}:\n{name}", " / {company}", " / {city}", " / {email}", "\nInterest: {topic}"),
    (
        "{name} is {a_role}", " at {company}", " based in {city}",
        ". {He} has spent the last decade working on {topic} and speaks about it often.", " Contact: {email}",
    ),
    (
        "Subject: Application, {Role}\n\nDear hiring team,\nplease find my CV attached.",
        (
            " I currently work at {company} and live in {city}.", " I currently work at {company}.",
            " I live in {city}.",
        ),
        " {noise}", "\n\nKind regards,\n{name}", "\n{email}",
    ),
    (
        "RSVP: yes!\nName: {name}\nPlus one: no", "\nTravelling from: {city}", "\nEmployer: {company}",
        "\nContact email: {email}", "\nComments: {noise}",
    ),
    (
        "Meeting notes, {day}\n* Attendee: {name}", " ({company})", "\n* Location: {city}",
        "\n* Next step: send the proposal to {email}", "\n* {noise}",
    ),
    (
        "Hello! My name is {name}", (" and I'm {a_role} at {company}", " and I'm {a_role}"),
        ". I saw your talk on {topic} and wondered if you'd have time for a short mentoring chat.",
        " I live in {city}, so a video call is probably easiest.", " My address is {email}.", " Thank you!",
    ),
    (
        "Ticket #{ticket}\nReported by: {name}", "\nAccount: {company}", "\nRegion: {city}",
        "\nReply-to: {email}", "\nIssue: {issue}",
    ),
    (
        "Volunteer form submitted.\nFull name: {name}\nAvailability: {day} mornings", "\nHome city: {city}",
        "\nEmployer (optional): {company}", "\nEmail: {email}", "\nHow did you hear about us: {source}",
    ),
    ("{name}; {Role}", "; {company}", "; {city}", "; {email}"),
    (
        'name="{name}"', ' company="{company}"', ' city="{city}"', ' email="{email}"', ' source="{source}"',
    ),
    (
        "BEGIN:VCARD\nFN:{name}\nTITLE:{Role}", "\nORG:{company}", "\nADR:{city}", "\nEMAIL:{email}",
        "\nEND:VCARD",
    ),
    (
        "Scribbled on a napkin after {event}: {name}", " - {company}", " - {city}", " - {email}",
        ". Call before {day}!",
    ),
    (
        "Re: {Topic}\n\n> {quote}\n\nThat works for me. {noise}", "\n\nCheers,\n{name}", " | {company}",
        " | {city}", "\n{email}",
    ),
    (
        "Guest for episode {ep}: {name}", (", {Role} at {company}.", ", {Role}."),
        " Recording remotely from {city}.", " Guest email: {email}.", " {noise}",
    ),
    (
        "Alumni update: {name} (class of {year})",
        (
            " has joined {company} and moved to {city}.", " has joined {company}.", " has moved to {city}.",
            " sends greetings to everyone.",
        ),
        " Say hello at {email}!", " {noise}",
    ),
    (
        "{greet}\n\nI'm {name}", (", {role_lc} at {company}", ""),
        ". We help teams with {topic} and I'd love 15 minutes of your time next week.",
        " I'm based in {city}, so happy to meet in person if you're nearby.", " {noise}",
        "\n\n{signoff},\n{first}", "\n{email}",
    ),
    (
        "Please welcome {name}", (" to the {company} family!", " to the team!"), " {He} joins us as {a_role}",
        (" and will work out of our {city} office.", "."), " Drop {him} a line at {email}.", " {noise}",
    ),
    (
        "Shipping contact for order {order}:\n{name}", "\n{company}", "\n{city}", "\nemail: {email}",
        "\nLeave the parcel at reception.",
    ),
    (
        "note to self - follow up with {name}", " ({company})", " re {topic}", ", {he}'s in {city}",
        ", {email}",
    ),
    (
        "Great to meet so many people at {event}. {noise} The contact I promised to share: {name}",
        ", who does {dept} at {company}",
        (
            ". {He} lives in {city} and says email works best: {email}.", ". {He} lives in {city}.",
            ". {He} says email works best: {email}.", ".",
        ),
    ),
    (
        "Newsletter signup\nsubscriber: {name}", "\nemail: {email}", "\nlocation: {city}",
        "\ncompany: {company}", "\nsource: {source}",
    ),
    (
        "Room booking for {day}, {time}. Guest: {name}", " from {company}", ", arriving from {city}",
        (". Confirmation will go to {email}.", "."), " {noise}",
    ),
    (
        "This is {name}", ", my old colleague from {company}",
        (
            "! {He} just moved to {city} and asked me to pass on {his} email: {email}.",
            "! {He} just moved to {city}.", ". {He} asked me to pass on {his} email: {email}.", ".",
        ),
        " {noise}",
    ),
    (
        "From: {name}", " <{email}>", "\nSubject: {Topic}\n\n{greet}\n\n{noise}",
        (
            " I'm writing from {city} on behalf of {company}.", " I'm writing from {city}.",
            " I'm writing on behalf of {company}.",
        ),
        " {noise2}", "\n\n{signoff},\n{first}",
    ),
    (
        "Visitor log, {day}\nVisitor: {name}", "\nCompany: {company}", "\nComing from: {city}",
        "\nVisitor email: {email}", "\nBadge returned: yes",
    ),
    ("{name}", (" · {Role} at {company}", " · {Role}"), " · {city}", " · {email}", " · {hobby}"),
    (
        "Quick intro: {name}", (" is {a_role} at {company}", " is {a_role}"), " in {city}",
        " and would like to chat about {topic}.", " Email: {email}.", " {noise}",
    ),
    (
        "Contact for the {topic} panel:\n* {name}", "\n* {company}", "\n* {city}", "\n* {email}",
        "\nSlot: {day} {time}",
    ),
    (
        "[voice note] um so I met {name}", ", {he} works for {company}", ", {he}'s over in {city}",
        ", and {his} email is {email}", ", anyway {noise_lc}",
    ),
    (
        "Dear colleagues,\n\nI am pleased to introduce {name}", (", {role_lc} at {company},", ","),
        " who will coordinate our work on {topic}.", " {He} is based in {city}.",
        " Please direct questions to {email}.", "\n\nWith best wishes",
    ),
    (
        "URGENT - PLEASE ADD TO CRM: {name}", ", {company}", ", {city}", ", {email}",
        ". MET AT {EVENT}. THANKS!",
    ),
    ("signed up for {event_lc}: {name}", " / {email}", " / {company}", " / {city}", " (paid, {diet})"),
    (
        ("Greetings from {city}!", "Greetings!"), " {noise}", " This is {name}", " of {company}",
        ", writing to confirm {day} at {time}.", " Write back to {email} whenever you can.",
    ),
    (
        ("{email} belongs to {name}", "The contact is {name}"), ", who is with {company}", " in {city}",
        ". {He} asked for a follow-up about {topic}.", " {noise}",
    ),
    (
        "Could you add this person to the {topic} list? {name}", ", {company}", " ({city})",
        (". Preferred contact: {email}.", "."), " Thanks!",
    ),
    (
        "{first} here! Full name for the form is {name}", ". Company: {company}", ". I'm in {city}",
        ". Use {email} for the confirmation", ". {noise}",
    ),
]
# fmt: on

CORRECTIONS: dict[str, list[str]] = {
    "city_change": [
        "Actually {he} moved to {city} last month.",
        "Quick update: {first} is now based in {city}.",
        "Oh, one more thing, {he} relocated to {city}.",
        "Wait, {he} lives in {city} now.",
    ],
    "city_add": ["Forgot to mention: {he} lives in {city}.", "Oh and {he}'s based in {city}."],
    "email_change": [
        "Sorry, {his} email is {email}.",
        "Correction: the address should be {email}.",
        "Wrong email, use {email} instead.",
    ],
    "email_add": ["I just found {his} email: {email}.", "Oh, {his} email is {email}."],
    "company_change": [
        "Update: {he} just joined {company}.",
        "{He} left that job and is at {company} now.",
    ],
    "company_add": ["Forgot to say, {he} works at {company}.", "Oh, {he}'s with {company}."],
    "company_change_email": [
        "Update: {he} joined {company}, new address is {email}.",
        "{He} is at {company} now, so the email changed to {email}.",
    ],
}
