#!/usr/bin/env python3
"""Generate philora's sample chat dataset: contact extraction into fixed JSON.

Each user message is a short free-text note that mentions one person; the
assistant replies with exactly one line of JSON::

    {"name": "...", "company": "...", "city": "...", "email": "..."}

Fields not stated in the text are null, and every non-null value appears in
the text verbatim. The eval split uses first names, last names and companies
that never occur in train.

Usage:
    python scripts/make_sample_data.py           # (re)write the two files
    python scripts/make_sample_data.py --check   # exit 1 if files are stale

Stdlib only and fully deterministic (fixed seed, no set iteration).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

SEED = 1729
OUT_DIR = Path(__file__).resolve().parent.parent / "philora" / "sample"
EVAL_FRACTION = 0.15  # share of each name/company list reserved for eval
NULL_RATE = 0.2  # per optional field
COMPANY_EMAIL_RATE = 0.7  # email on the company domain when a company is known

# (shape, has_system_prompt) -> number of rows
TRAIN_SHAPES: dict[tuple[str, bool], int] = {
    ("single", False): 216,
    ("single", True): 54,
    ("multi", False): 43,
    ("multi", True): 29,
    ("correction", False): 11,
    ("correction", True): 7,
}
EVAL_SHAPES: dict[tuple[str, bool], int] = {
    ("single", True): 60,
    ("multi", True): 16,
    ("correction", True): 4,
}

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


# --------------------------------------------------------------------------
# People and text
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    female: list[str]
    male: list[str]
    last: list[str]
    companies: list[str]


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    female: bool
    company: str | None
    city: str | None
    email: str | None

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def answer(self) -> str:
        record = {"name": self.name, "company": self.company, "city": self.city, "email": self.email}
        return json.dumps(record, ensure_ascii=False)


def split_pools(rng: random.Random) -> tuple[Pool, Pool]:
    """Reserve EVAL_FRACTION of each name/company list for eval only."""

    def split(items: list[str]) -> tuple[list[str], list[str]]:
        shuffled = rng.sample(items, len(items))
        k = round(len(items) * EVAL_FRACTION)
        return shuffled[k:], shuffled[:k]

    parts = [split(items) for items in (FEMALE_FIRST, MALE_FIRST, LAST_NAMES, COMPANIES)]
    return Pool(*(p[0] for p in parts)), Pool(*(p[1] for p in parts))


def slug(text: str) -> str:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]", "", plain.lower())


def company_domain(company: str) -> str:
    key = slug(company)
    return f"{key}.{COMPANY_TLDS[zlib.crc32(key.encode()) % len(COMPANY_TLDS)]}"


def make_email(rng: random.Random, first: str, last: str, domain: str) -> str:
    f, la = slug(first), slug(last)
    styles = [f"{f}.{la}", f"{f[0]}{la}", f"{f}_{la}", f"{f}-{la}", f"{f[0]}.{la}", f"{f}{la[0]}"]
    # Bare first names only on company domains; personal ones often carry digits.
    styles.append(f"{f}{la}{rng.randint(1, 99)}" if domain in PERSONAL_DOMAINS else f)
    return f"{rng.choice(styles)}@{domain}"


def pick_email(rng: random.Random, first: str, last: str, company: str | None) -> str:
    use_company = company is not None and rng.random() < COMPANY_EMAIL_RATE
    domain = company_domain(company) if use_company else rng.choice(PERSONAL_DOMAINS)
    return make_email(rng, first, last, domain)


class NullDeck:
    """Decides which optional fields are null: exactly NULL_RATE per block of 10."""

    BLOCK = [True] * round(10 * NULL_RATE) + [False] * round(10 * (1 - NULL_RATE))

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[str, list[bool]] = {f: [] for f in OPTIONAL_FIELDS}

    def is_null(self, field: str) -> bool:
        queue = self.queues[field]
        if not queue:
            queue.extend(self.rng.sample(self.BLOCK, len(self.BLOCK)))
        return queue.pop()


def make_person(rng: random.Random, pool: Pool, deck: NullDeck) -> Person:
    female = rng.random() < 0.5
    first = rng.choice(pool.female if female else pool.male)
    last = rng.choice(pool.last)
    company = None if deck.is_null("company") else rng.choice(pool.companies)
    city = None if deck.is_null("city") else rng.choice(CITIES)
    email = None if deck.is_null("email") else pick_email(rng, first, last, company)
    return Person(first, last, female, company, city, email)


def lower_role(role: str) -> str:
    return " ".join(w if w.isupper() else w.lower() for w in role.split())


def with_article(role_lc: str) -> str:
    if role_lc.startswith("head of"):
        return f"the {role_lc}"
    return ("an " if role_lc[0] in "aeiou" else "a ") + role_lc


def fill_values(rng: random.Random, p: Person) -> dict[str, str | None]:
    role = rng.choice(ROLES)
    role_lc = lower_role(role)
    noise, noise2 = rng.sample(NOISE, 2)
    event, topic, day = rng.choice(EVENTS), rng.choice(TOPICS), rng.choice(DAYS)
    he = "she" if p.female else "he"
    return {
        "name": p.name,
        "first": p.first,
        "company": p.company,
        "city": p.city,
        "email": p.email,
        "Role": role,
        "role_lc": role_lc,
        "a_role": with_article(role_lc),
        "he": he,
        "He": he.capitalize(),
        "his": "her" if p.female else "his",
        "him": "her" if p.female else "him",
        "noise": noise,
        "noise2": noise2,
        "noise_lc": noise.lower(),
        "event": event,
        "event_lc": event.lower(),
        "EVENT": event.upper(),
        "topic": topic,
        "Topic": topic.capitalize(),
        "day": day,
        "day_lc": day.lower(),
        "time": rng.choice(TIMES),
        "dept": rng.choice(DEPTS),
        "diet": rng.choice(DIETS),
        "blurb": rng.choice(BLURBS),
        "greet": rng.choice(GREETINGS),
        "signoff": rng.choice(SIGNOFFS),
        "issue": rng.choice(ISSUES),
        "source": rng.choice(SOURCES),
        "hobby": rng.choice(HOBBIES),
        "quote": rng.choice(QUOTES),
        "fwd_open": rng.choice(FWD_OPENERS),
        "ticket": str(rng.randint(10000, 99999)),
        "order": f"A-{rng.randint(1000, 9999)}",
        "ep": str(rng.randint(12, 180)),
        "year": str(rng.randint(1998, 2020)),
    }


def render(template: tuple[Part, ...], values: dict[str, str | None]) -> str:
    def usable(option: str) -> bool:
        return all(values[f] is not None for f in FIELD_RE.findall(option) if f in OPTIONAL_FIELDS)

    out = []
    for part in template:
        options = (part,) if isinstance(part, str) else part
        out.append(next((o.format(**values) for o in options if usable(o)), ""))
    return "".join(out)


def _alternation(items: list[str]) -> re.Pattern[str]:
    ordered = sorted(items, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(s) for s in ordered) + r")\b")


CITY_RE = _alternation(CITIES)
COMPANY_RE = _alternation(COMPANIES)
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def check_text(text: str, p: Person) -> None:
    """The text must state exactly the non-null fields, verbatim, and nothing else."""
    found = {
        "city": set(CITY_RE.findall(text)),
        "company": set(COMPANY_RE.findall(text)),
        "email": set(EMAIL_RE.findall(text)),
    }
    expected = {"city": p.city, "company": p.company, "email": p.email}
    for field, value in expected.items():
        if found[field] != ({value} if value else set()):
            raise ValueError(f"{field} mismatch ({found[field]} vs {value!r}) in:\n{text}")
    if p.name not in text:
        raise ValueError(f"name {p.name!r} missing in:\n{text}")
    if not all(ord(c) < 256 for c in text):
        raise ValueError(f"non-Latin-1 character in:\n{text}")


def check_templates() -> None:
    """Render every template with every combination of null fields."""
    rng = random.Random(0)  # separate stream: does not disturb the dataset
    full = Person("Ana", "Costa", True, "Brightwave", "Lisbon", "ana@brightwave.io")
    for template in TEMPLATES:
        for mask in range(8):
            nulls = {f: None for i, f in enumerate(OPTIONAL_FIELDS) if mask >> i & 1}
            p = replace(full, **nulls)
            check_text(render(template, fill_values(rng, p)), p)


def contact_text(rng: random.Random, p: Person) -> tuple[str, int]:
    index = rng.randrange(len(TEMPLATES))
    text = render(TEMPLATES[index], fill_values(rng, p))
    check_text(text, p)
    return text, index


def user_turn(rng: random.Random, text: str, first_turn: bool) -> str:
    r = rng.random()
    if r < 0.3:
        prefix = rng.choice(PREFIXES)
    elif not first_turn and r < 0.65:
        prefix = rng.choice(FOLLOWUPS)
    else:
        return text
    separators = SEPARATORS[:2] if "\n" in text else SEPARATORS
    return prefix + rng.choice(separators) + text


def make_correction(rng: random.Random, pool: Pool, p: Person) -> tuple[Person, str]:
    field = rng.choice(OPTIONAL_FIELDS)
    if field == "city":
        new = replace(p, city=rng.choice([c for c in CITIES if c != p.city]))
        kind = "city_change" if p.city else "city_add"
    elif field == "email":
        email = p.email
        while email == p.email:
            email = pick_email(rng, p.first, p.last, p.company)
        new = replace(p, email=email)
        kind = "email_change" if p.email else "email_add"
    else:
        company = rng.choice([c for c in pool.companies if c != p.company])
        new = replace(p, company=company)
        kind = "company_change" if p.company else "company_add"
        if p.company and p.email and p.email.endswith("@" + company_domain(p.company)):
            email = make_email(rng, p.first, p.last, company_domain(company))
            new, kind = replace(new, email=email), "company_change_email"
    values = fill_values(rng, new)
    note = rng.choice(CORRECTIONS[kind]).format(**values)
    for value in (new.city, new.company, new.email):
        if value and value not in (p.city, p.company, p.email) and value not in note:
            raise ValueError(f"correction misses {value!r}: {note}")
    return new, note


# --------------------------------------------------------------------------
# Conversations and splits
# --------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    system: bool
    messages: list[dict[str, str]]
    answers: list[Person]
    templates: list[int]


def build_row(rng: random.Random, pool: Pool, deck: NullDeck, shape: str, system: bool, max_turns: int) -> Row:
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = {"single": 1, "correction": 1}.get(shape) or rng.randint(2, max_turns)
    answers: list[Person] = []
    templates: list[int] = []
    for i in range(turns):
        person = make_person(rng, pool, deck)
        text, index = contact_text(rng, person)
        messages.append({"role": "user", "content": user_turn(rng, text, first_turn=i == 0)})
        messages.append({"role": "assistant", "content": person.answer()})
        answers.append(person)
        templates.append(index)
    if shape == "correction":
        person, note = make_correction(rng, pool, answers[-1])
        messages.append({"role": "user", "content": note})
        messages.append({"role": "assistant", "content": person.answer()})
        answers.append(person)
    return Row(shape, system, messages, answers, templates)


def build_split(
    rng: random.Random, pool: Pool, shapes: dict[tuple[str, bool], int], max_turns: int, seen: set[str]
) -> list[Row]:
    rows: list[Row] = []
    deck = NullDeck(rng)
    for (shape, system), count in shapes.items():
        while count:
            row = build_row(rng, pool, deck, shape, system, max_turns)
            key = json.dumps(row.messages, ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
            count -= 1
    rng.shuffle(rows)
    return rows


def check_held_out(train: list[Row], evals: list[Row]) -> None:
    def entities(rows: list[Row]) -> tuple[set[str], set[str], set[str]]:
        people = [p for r in rows for p in r.answers]
        return {p.first for p in people}, {p.last for p in people}, {p.company or "" for p in people}

    for seen_train, seen_eval in zip(entities(train), entities(evals), strict=True):
        leaked = (seen_train & seen_eval) - {""}
        if leaked:
            raise ValueError(f"eval leaks into train: {sorted(leaked)}")


def generate() -> dict[str, list[Row]]:
    check_templates()
    rng = random.Random(SEED)
    train_pool, eval_pool = split_pools(rng)
    seen: set[str] = set()
    train = build_split(rng, train_pool, TRAIN_SHAPES, max_turns=3, seen=seen)
    evals = build_split(rng, eval_pool, EVAL_SHAPES, max_turns=2, seen=seen)
    check_held_out(train, evals)
    return {"train.jsonl": train, "eval.jsonl": evals}


def serialize(rows: list[Row]) -> bytes:
    lines = [json.dumps({"messages": r.messages}, ensure_ascii=False) for r in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def summarize(name: str, rows: list[Row]) -> str:
    shapes = Counter(r.shape if r.shape != "multi" else f"multi-{len(r.templates)}" for r in rows)
    answers = [p for r in rows for p in r.answers[: len(r.templates)]]
    nulls = {f: sum(getattr(p, f) is None for p in answers) / len(answers) for f in OPTIONAL_FIELDS}
    words = [len(m["content"].split()) for r in rows for m in r.messages if m["role"] == "user"]
    chars = sum(len(json.dumps({"messages": r.messages}, ensure_ascii=False)) for r in rows)
    in_range = sum(15 <= w <= 45 for w in words) / len(words)
    return "\n".join(
        [
            f"{name}: {len(rows)} rows, shapes {dict(sorted(shapes.items()))}, "
            f"with system prompt {sum(r.system for r in rows)}",
            f"  extractions {len(answers)}, null rates " + ", ".join(f"{f} {v:.1%}" for f, v in nulls.items()),
            f"  templates used {len({t for r in rows for t in r.templates})}/{len(TEMPLATES)}, "
            f"user words median {median(words)}, 15-45 words {in_range:.0%}, "
            f"avg chars/row {chars / len(rows):.0f}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if files on disk are stale")
    args = parser.parse_args()
    splits = generate()
    if args.check:
        stale = [
            n
            for n, rows in splits.items()
            if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_bytes() != serialize(rows)
        ]
        for n in stale:
            print(f"stale: {OUT_DIR / n}", file=sys.stderr)
        if not stale:
            print(f"up to date: {OUT_DIR}")
        return 1 if stale else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for n, rows in splits.items():
        (OUT_DIR / n).write_bytes(serialize(rows))
        print(summarize(n, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
