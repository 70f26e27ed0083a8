"""The server-side functions and the trigger that ``keyledger db init`` installs.

Each function saves round trips on a hot write path; every one of them takes the events
table's EXCLUSIVE lock first, as every writer does, so positions commit in order. A
schema made by an older version may lack one: the recorder then falls back to sending the
same statements one by one (slower, same result) and logs one warning.

- ``kl_append_read_v1``: one read (the common case: a lone retrieve), scalar arguments.
  Planned once per connection as a handful of primary-key statements, it costs the
  server about half of what the batch function costs for a batch of one.
- ``kl_append_reads_v1``: a group-committed batch of reads, as arrays.
- ``kl_store_created_v1``: a store of a new secret (one ``SecretCreated``, no key material;
  the common write), written and committed as one call: the lock, the check of the
  keyring's version, the event and its catalog row.
- ``kl_store_updated_v1``: the same for a new value of an existing secret (one
  ``SecretStored``), its catalog row updated and its access count returned.
- ``kl_append_unit_v1``: the head of every other write unit's pipeline: the lock, the
  notification to projection workers, the check of the versions the decision was made
  on (raising SQLSTATE ``KL409``, which aborts the pipeline's transaction without a round
  trip to decide) and the append of the unit's events, whose positions it returns.
- ``kl_begin_write_v1``: the same without the append (0.4.0's pipelines used it with an
  INSERT of their own); kept for processes of that version sharing the schema.

Every function runs with ``plan_cache_mode = force_generic_plan``. PL/pgSQL caches each
statement's plan, but for a statement with parameters the plan cache builds a fresh
custom plan on every call as long as it judges the custom plans cheaper than the generic
one, and for the batch function's joins over ``unnest`` of array parameters it always
did: planning was a sixth of the server's CPU in a batch of reads (``perf`` on the
backend). Forced generic plans are the same index scans, planned once per connection;
measured here, a batch of 4 to 8 reads cost the server 20-25% less CPU. A schema whose
functions lack the setting (made by keyledger 0.9.0 or older) works unchanged, and
``keyledger db check`` reports its functions as outdated until ``db init`` replaces them.
"""

from __future__ import annotations

from keyledger.projections.catalog import CatalogProjector

APPEND_READ_FUNCTION = "kl_append_read_v1"
APPEND_READS_FUNCTION = "kl_append_reads_v1"
APPEND_UNIT_FUNCTION = "kl_append_unit_v1"
STORE_CREATED_FUNCTION = "kl_store_created_v1"
STORE_UPDATED_FUNCTION = "kl_store_updated_v1"
BEGIN_WRITE_FUNCTION = "kl_begin_write_v1"
FUNCTIONS = (
    APPEND_READ_FUNCTION,
    APPEND_READS_FUNCTION,
    APPEND_UNIT_FUNCTION,
    STORE_CREATED_FUNCTION,
    STORE_UPDATED_FUNCTION,
    BEGIN_WRITE_FUNCTION,
)
# The clauses every function is created with (see the module docstring), and the entry
# the generic-plan one leaves in pg_proc.proconfig.
_SETTINGS = "SET search_path FROM CURRENT SET plan_cache_mode = force_generic_plan"
GENERIC_PLANS_SETTING = "plan_cache_mode=force_generic_plan"
STALE_SQLSTATE = "KL409"  # raised by kl_begin_write_v1: a decision was made on stale state
# Batches of reads up to this size are written by one statement per read (see
# append_reads_statement); larger ones by set-based statements.
SMALL_BATCH = 3


def function_statements(table: str, channel: str) -> list[str]:
    """``CREATE OR REPLACE`` of every function, for the events ``table`` and the
    notification ``channel`` of one schema."""
    return [
        append_read_statement(table, channel),
        append_reads_statement(table, channel),
        append_unit_statement(table, channel),
        store_created_statement(table, channel),
        store_updated_statement(table, channel),
        begin_write_statement(table, channel),
    ]


def function_bodies(table: str, channel: str) -> dict[str, str]:
    """Each function's name and body (the text between its ``$fn$`` quotes, which the
    server keeps verbatim as ``pg_proc.prosrc``): ``db check`` compares them."""
    bodies = {}
    for statement in function_statements(table, channel):
        name = statement.removeprefix("CREATE OR REPLACE FUNCTION ").split("(", 1)[0]
        bodies[name] = statement.split("$fn$")[1]
    return bodies


def append_read_statement(table: str, channel: str) -> str:
    """One read, written and committed as one call (made outside any transaction).

    It takes the lock, checks the (at most two) versions the read was decided on (the
    secret's and the keyring's; a NULL id is skipped) and, only if neither moved on,
    appends the read event, notifies the projection workers and counts the read in the
    catalog. Returns whether the decision was stale (then nothing was written), the
    event's position and the secret's new access count (NULL: no catalog row)."""
    return f"""CREATE OR REPLACE FUNCTION {APPEND_READ_FUNCTION}(
    p_expected_id1 uuid, p_expected_version1 bigint,
    p_expected_id2 uuid, p_expected_version2 bigint,
    p_id uuid, p_topic text, p_state bytea,
    p_tenant text, p_name text, p_at bigint,
    OUT stale boolean, OUT read_position bigint, OUT read_count bigint)
LANGUAGE plpgsql {_SETTINGS} AS $fn$
BEGIN
{_checked_append(table, channel, "read_position")}
    UPDATE kl_catalog SET access_count = kl_catalog.access_count + 1,
        last_accessed_at = GREATEST(kl_catalog.last_accessed_at, p_at)
    WHERE kl_catalog.tenant_id = p_tenant AND kl_catalog.name = p_name
    RETURNING kl_catalog.access_count INTO read_count;
END
$fn$"""


def append_reads_statement(table: str, channel: str) -> str:
    """A batch of reads, written and committed as one call (made outside any
    transaction).

    It takes the lock, checks the versions the reads were decided on, and only if none
    moved on, appends the read events, notifies the projection workers and adds the
    reads to the catalog's access counts. It returns whether a decision was stale (then
    nothing was written), the positions of the events in the order given, and each
    secret's new access count. The arrays come as the client builds them: parallel
    arrays of equal length, (tenant, name) pairs unique (``CatalogProjector.read_totals``).
    Up to ``SMALL_BATCH`` reads are written with one
    primary-key statement each, larger batches with set-based statements (measured with
    8 and 2 threads: the statements per read cost the server less for a few reads, the
    joins for many).
    """
    return f"""CREATE OR REPLACE FUNCTION {APPEND_READS_FUNCTION}(
    expected_ids uuid[], expected_versions bigint[],
    ids uuid[], topics text[], states bytea[],
    tenants text[], names text[], counts bigint[], ats bigint[],
    OUT stale boolean, OUT positions bigint[],
    OUT counted_tenants text[], OUT counted_names text[], OUT counted bigint[])
LANGUAGE plpgsql {_SETTINGS} AS $fn$
DECLARE
    k integer;
    appended bigint;
    count_now bigint;
BEGIN
    LOCK TABLE {table} IN EXCLUSIVE MODE;
    IF pg_catalog.cardinality(ids) <= {SMALL_BATCH} THEN
        -- A few reads: primary-key statements, one per read, planned once per connection,
        -- cost the server less than the joins below (which win for larger batches).
        FOR k IN 1 .. COALESCE(pg_catalog.cardinality(expected_ids), 0) LOOP
            IF COALESCE((SELECT MAX(originator_version) FROM {table}
                         WHERE originator_id = expected_ids[k]), 0) <> expected_versions[k]
            THEN
                stale := true;
                RETURN;
            END IF;
        END LOOP;
        stale := false;
        PERFORM pg_notify('{channel}', '');
        positions := '{{}}';
        FOR k IN 1 .. COALESCE(pg_catalog.cardinality(ids), 0) LOOP
            INSERT INTO {table} (originator_id, originator_version, topic, state)
            VALUES (ids[k], 1, topics[k], states[k]) RETURNING notification_id INTO appended;
            positions := pg_catalog.array_append(positions, appended);
        END LOOP;
        FOR k IN 1 .. COALESCE(pg_catalog.cardinality(tenants), 0) LOOP
            UPDATE kl_catalog
            SET access_count = kl_catalog.access_count + counts[k],
                last_accessed_at = GREATEST(kl_catalog.last_accessed_at, ats[k])
            WHERE kl_catalog.tenant_id = tenants[k] AND kl_catalog.name = names[k]
            RETURNING kl_catalog.access_count INTO count_now;
            IF FOUND THEN
                counted_tenants := pg_catalog.array_append(counted_tenants, tenants[k]);
                counted_names := pg_catalog.array_append(counted_names, names[k]);
                counted := pg_catalog.array_append(counted, count_now);
            END IF;
        END LOOP;
        RETURN;
    END IF;
    SELECT EXISTS (
        SELECT 1 FROM unnest(expected_ids, expected_versions) AS e(id, version)
        WHERE e.version <> COALESCE(
            (SELECT MAX(originator_version) FROM {table} WHERE originator_id = e.id), 0)
    ) INTO stale;
    IF stale THEN
        RETURN;
    END IF;
    PERFORM pg_notify('{channel}', '');
    WITH inserted AS (
        INSERT INTO {table} (originator_id, originator_version, topic, state)
        SELECT u.id, 1, u.topic, u.state
        FROM unnest(ids, topics, states) WITH ORDINALITY AS u(id, topic, state, n)
        ORDER BY u.n
        RETURNING originator_id, notification_id
    )
    SELECT pg_catalog.array_agg(i.notification_id ORDER BY u.n) INTO positions
    FROM inserted AS i
    JOIN pg_catalog.unnest(ids) WITH ORDINALITY AS u(id, n) ON u.id = i.originator_id;
    WITH updated AS (
        UPDATE kl_catalog
        SET access_count = kl_catalog.access_count + v.n,
            last_accessed_at = GREATEST(kl_catalog.last_accessed_at, v.at)
        FROM unnest(tenants, names, counts, ats) AS v(tenant_id, name, n, at)
        WHERE kl_catalog.tenant_id = v.tenant_id AND kl_catalog.name = v.name
        RETURNING kl_catalog.tenant_id, kl_catalog.name, kl_catalog.access_count
    )
    SELECT pg_catalog.array_agg(tenant_id), pg_catalog.array_agg(name),
        pg_catalog.array_agg(access_count)
    INTO counted_tenants, counted_names, counted FROM updated;
END
$fn$"""


def append_unit_statement(table: str, channel: str) -> str:
    """The head of a write unit's pipeline (inside its transaction): the lock, the
    notification, the version check that fails the transaction when an aggregate the
    decision was based on has moved on, and the append of the unit's events. Returns
    their positions in the order given. One statement instead of two."""
    return f"""CREATE OR REPLACE FUNCTION {APPEND_UNIT_FUNCTION}(
    expected_ids uuid[], expected_versions bigint[],
    ids uuid[], versions bigint[], topics text[], states bytea[])
RETURNS bigint[] LANGUAGE plpgsql {_SETTINGS} AS $fn$
DECLARE
    stale uuid;
    positions bigint[];
BEGIN
{_lock_notify_check(table, channel, "expected_ids", "expected_versions")}
    -- Rows go in in the order given, so their positions ascend in that order.
    WITH inserted AS (
        INSERT INTO {table} (originator_id, originator_version, topic, state)
        SELECT u.id, u.version, u.topic, u.state
        FROM unnest(ids, versions, topics, states)
            WITH ORDINALITY AS u(id, version, topic, state, n)
        ORDER BY u.n
        RETURNING notification_id
    )
    SELECT pg_catalog.array_agg(notification_id ORDER BY notification_id) INTO positions
    FROM inserted;
    RETURN COALESCE(positions, '{{}}');
END
$fn$"""


# The catalog row's parameters of kl_store_created_v1, in CatalogProjector.created's order.
CREATED_ROW_PARAMETERS = (
    ("p_secret_id", "text"),
    ("p_tenant", "text"),
    ("p_name", "text"),
    ("p_category", "text"),
    ("p_description", "text"),
    ("p_metadata", "text"),
    ("p_key_version", "integer"),
    ("p_envelope_version", "integer"),
    ("p_expires_at", "bigint"),
    ("p_created_at", "bigint"),
    ("p_updated_at", "bigint"),
)


def store_created_statement(table: str, channel: str) -> str:
    """A new secret, written and committed as one call (made outside any transaction).

    It takes the lock, checks the (at most two) versions the store was decided on (a NULL
    id is skipped) and, only if neither moved on, notifies the projection workers,
    appends the ``SecretCreated`` (version 1) and inserts its catalog row, with the
    catalog projection's own statement. Returns whether the decision was stale (then
    nothing was written) and the event's position. A secret that exists after all fails
    on the events table's primary key, as any colliding append does."""
    row = ",\n    ".join(f"{name} {kind}" for name, kind in CREATED_ROW_PARAMETERS)
    insert = CatalogProjector.created_insert([name for name, _ in CREATED_ROW_PARAMETERS])
    return f"""CREATE OR REPLACE FUNCTION {STORE_CREATED_FUNCTION}(
    p_expected_id1 uuid, p_expected_version1 bigint,
    p_expected_id2 uuid, p_expected_version2 bigint,
    p_id uuid, p_topic text, p_state bytea,
    {row},
    OUT stale boolean, OUT event_position bigint)
LANGUAGE plpgsql {_SETTINGS} AS $fn$
BEGIN
{_checked_append(table, channel, "event_position")}
    {insert};
END
$fn$"""


# The catalog values of kl_store_updated_v1, in CatalogProjector.stored_row's order.
STORED_ROW_PARAMETERS = (
    ("p_disabled", "integer"),
    ("p_expired", "integer"),
    ("p_category", "text"),
    ("p_description", "text"),
    ("p_metadata", "text"),
    ("p_value_version", "integer"),
    ("p_key_version", "integer"),
    ("p_envelope_version", "integer"),
    ("p_expires_at", "bigint"),
    ("p_at", "bigint"),
)


def store_updated_statement(table: str, channel: str) -> str:
    """A new value of an existing secret, written and committed as one call (made outside
    any transaction): as ``kl_store_created_v1``, with the event at its version and the
    catalog row updated by the projection's own statement (its revived-name variant when
    ``p_revived``). Returns whether the decision was stale, the event's position and the
    row's access count and last read (NULL: no catalog row). A concurrent store of the
    same version fails on the events table's primary key."""
    row = [name for name, _ in STORED_ROW_PARAMETERS]
    declared = ",\n    ".join(f"{name} {kind}" for name, kind in STORED_ROW_PARAMETERS)
    into = " INTO stored_count, stored_last_accessed_at"
    update = CatalogProjector.stored_update(False, [*row, "p_tenant", "p_name"])
    revive = CatalogProjector.stored_update(True, [*row, "p_at", "p_tenant", "p_name"])
    return f"""CREATE OR REPLACE FUNCTION {STORE_UPDATED_FUNCTION}(
    p_expected_id1 uuid, p_expected_version1 bigint,
    p_expected_id2 uuid, p_expected_version2 bigint,
    p_id uuid, p_event_version bigint, p_topic text, p_state bytea, p_revived boolean,
    {declared},
    p_tenant text, p_name text,
    OUT stale boolean, OUT event_position bigint,
    OUT stored_count bigint, OUT stored_last_accessed_at bigint)
LANGUAGE plpgsql {_SETTINGS} AS $fn$
BEGIN
{_checked_append(table, channel, "event_position", "p_event_version")}
    IF p_revived THEN
        {revive}{into};
    ELSE
        {update}{into};
    END IF;
END
$fn$"""


def begin_write_statement(table: str, channel: str) -> str:
    """The head of a write unit's pipeline (inside its transaction): the lock, the
    notification, and the version check that fails the transaction when an aggregate
    the decision was based on has moved on. One statement instead of three."""
    return f"""CREATE OR REPLACE FUNCTION {BEGIN_WRITE_FUNCTION}(ids uuid[], versions bigint[])
RETURNS void LANGUAGE plpgsql {_SETTINGS} AS $fn$
DECLARE
    stale uuid;
BEGIN
{_lock_notify_check(table, channel, "ids", "versions")}
END
$fn$"""


def _checked_append(table: str, channel: str, position: str, version: str = "1") -> str:
    """The head of the one-event functions' bodies: lock; set ``stale`` and return if an
    aggregate ``p_expected_id1``/``p_expected_id2`` (NULL: none) is no longer at its
    version ``p_expected_version1``/``p_expected_version2``; else notify and append the
    event ``p_id`` (at ``version``, an SQL expression), its position into ``position``."""
    return f"""    LOCK TABLE {table} IN EXCLUSIVE MODE;
    stale := (p_expected_id1 IS NOT NULL
              AND COALESCE((SELECT MAX(originator_version) FROM {table}
                            WHERE originator_id = p_expected_id1), 0) <> p_expected_version1)
        OR (p_expected_id2 IS NOT NULL
            AND COALESCE((SELECT MAX(originator_version) FROM {table}
                          WHERE originator_id = p_expected_id2), 0) <> p_expected_version2);
    IF stale THEN
        RETURN;
    END IF;
    PERFORM pg_notify('{channel}', '');
    INSERT INTO {table} (originator_id, originator_version, topic, state)
    VALUES (p_id, {version}, p_topic, p_state) RETURNING notification_id INTO {position};"""


def _lock_notify_check(table: str, channel: str, ids: str, versions: str) -> str:
    """The head of the unit functions' bodies: lock, notify, and raise ``KL409`` when an
    aggregate of the arrays ``ids``/``versions`` is no longer at its version. The variable
    ``stale uuid`` must be declared."""
    return f"""    LOCK TABLE {table} IN EXCLUSIVE MODE;
    PERFORM pg_notify('{channel}', '');
    SELECT e.id INTO stale FROM unnest({ids}, {versions}) AS e(id, version)
    WHERE e.version <> COALESCE(
        (SELECT MAX(originator_version) FROM {table} WHERE originator_id = e.id), 0)
    LIMIT 1;
    IF stale IS NOT NULL THEN
        RAISE EXCEPTION 'keyledger: aggregate % moved on', stale USING ERRCODE = '{STALE_SQLSTATE}';
    END IF;"""


def append_only_statements(table: str) -> list[str]:
    """The trigger that makes the events table refuse UPDATE, DELETE and TRUNCATE."""
    return [
        "CREATE OR REPLACE FUNCTION kl_refuse_event_change() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
        "'the keyledger event stream is append-only: % refused', TG_OP "
        "USING ERRCODE = 'insufficient_privilege'; END $$",
        f"CREATE OR REPLACE TRIGGER kl_events_append_only BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION kl_refuse_event_change()",
        f"CREATE OR REPLACE TRIGGER kl_events_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION kl_refuse_event_change()",
    ]
