-- What the timeline's service role may do, given by `beeldportaal migrate --grant-to <role>`
-- (run as the schema's owner): read and write the projection, add to the access log and read
-- it. Not owning access_log, it can neither disable its append-only triggers nor drop it; the
-- projection's rebuild runs as the owner (or a member of its role), which keeps these grants.
GRANT SELECT, INSERT ON access_log TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON
    timeline_sources, timeline_series, timeline_instances, timeline_reports,
    timeline_deliveries, timeline_revocations, timeline_studies, timeline_entries
TO {role};
