-- MySQL init script for docker-compose.yml (run once, on an empty data volume, as root), for every
-- image that .github/workflows/compat.yml tests: mysql:8.0, mysql:8.4 and mysql:9. Plain MySQL
-- syntax, none of MariaDB's (no BINLOG MONITOR: on MySQL, REPLICATION CLIENT covers the binlog
-- status). Mirrors what dev/stack sets up on MariaDB; the seed tables come from dev/seed.sql.
CREATE DATABASE IF NOT EXISTS test CHARACTER SET utf8mb4 COLLATE utf8mb4_0900_ai_ci;

-- The CDC reader: least privileges to stream the binlog and take a consistent snapshot.
--   REPLICATION SLAVE   the binlog dump (the privilege keeps this name in 8.4 and 9.x)
--   REPLICATION CLIENT  SHOW BINARY LOGS and the binlog end: SHOW BINARY LOG STATUS (8.2 and
--                       later; 8.4 removed SHOW MASTER STATUS), SHOW MASTER STATUS before 8.2
--   SELECT              the snapshot's reads, information_schema
--   RELOAD              FLUSH TABLES WITH READ LOCK, under which the snapshot reads its position
--   LOCK TABLES, SHOW VIEW  as dev/stack grants them on MariaDB
-- No IDENTIFIED WITH: the server's default plugin, caching_sha2_password (MySQL 8.0 and later).
-- ecst's default `tls = "disabled"` then logs in through that plugin's RSA public-key exchange.
-- ('%' because connections arrive from the Docker network; the port is published on 127.0.0.1 only.)
CREATE USER IF NOT EXISTS 'ecst'@'%' IDENTIFIED BY 'ecst';
GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT, RELOAD, LOCK TABLES, SHOW VIEW ON *.* TO 'ecst'@'%';

-- Tests: create databases/tables, DDL, FLUSH/PURGE BINARY LOGS, SET GLOBAL.
CREATE USER IF NOT EXISTS 'ecst_admin'@'%' IDENTIFIED BY 'ecst_admin';
GRANT ALL PRIVILEGES ON *.* TO 'ecst_admin'@'%' WITH GRANT OPTION;
FLUSH PRIVILEGES;
