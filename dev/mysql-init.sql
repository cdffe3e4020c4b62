-- MySQL 8.4 init script for docker-compose.yml (run once, on an empty data volume, as root).
-- Mirrors what dev/stack sets up on MariaDB; the seed tables come from dev/seed.sql (mounted next).
CREATE DATABASE IF NOT EXISTS test CHARACTER SET utf8mb4 COLLATE utf8mb4_0900_ai_ci;

-- The CDC reader: least privileges to stream the binlog and take a consistent snapshot.
-- ('%' because connections arrive from the Docker network; the port is published on 127.0.0.1 only.)
CREATE USER IF NOT EXISTS 'ecst'@'%' IDENTIFIED BY 'ecst';
GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT, RELOAD, LOCK TABLES, SHOW VIEW ON *.* TO 'ecst'@'%';

-- Tests: create databases/tables, DDL, FLUSH/PURGE BINARY LOGS, SET GLOBAL.
CREATE USER IF NOT EXISTS 'ecst_admin'@'%' IDENTIFIED BY 'ecst_admin';
GRANT ALL PRIVILEGES ON *.* TO 'ecst_admin'@'%' WITH GRANT OPTION;
FLUSH PRIVILEGES;
