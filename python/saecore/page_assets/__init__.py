"""Static files of the feature pages (HTML templates, CSS, JavaScript); no network access, no libraries."""
