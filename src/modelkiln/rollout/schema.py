"""SQLite schema of the model registry (created on first use; ``IF NOT EXISTS`` keeps it safe)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    stage TEXT NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    created TEXT NOT NULL,
    carries TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    rel TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (name, version, rel),
    FOREIGN KEY (name, version) REFERENCES versions(name, version)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    action TEXT NOT NULL,
    at TEXT NOT NULL
);
"""
