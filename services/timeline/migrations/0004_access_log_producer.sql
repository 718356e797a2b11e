-- Which service wrote the record (timeline-api, notify-api, ...): the access log holds the
-- records of every service that discloses patient data, the timeline's own and those its
-- access-log archive loads from the access-logged topic. NULL on records from before it was
-- kept, all of them the timeline's. Adding a column changes no record.
ALTER TABLE access_log ADD COLUMN producer text;
