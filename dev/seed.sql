-- Seed schema and rows for ecst's examples and tests (database `test`, utf8mb4).
-- Re-runnable: drops and recreates the tables. Used by `dev/stack` (fresh datadir, `dev/stack seed`)
-- and by docker-compose.yml (MySQL init scripts).
CREATE DATABASE IF NOT EXISTS test CHARACTER SET utf8mb4;

DROP TABLE IF EXISTS test.users;
CREATE TABLE test.users (
  id INT NOT NULL,
  firstname VARCHAR(45) NULL,
  lastname VARCHAR(45) NULL,
  email VARCHAR(45) NULL,
  PRIMARY KEY (id)
) DEFAULT CHARSET = utf8mb4;

INSERT INTO test.users (id, firstname, lastname, email) VALUES
  (1, 'Neha', 'Parate', 'neha.parate@gmail.com'),
  (2, 'Aravind', 'Dekate', 'aravind.dekate@gmail.com'),
  (3, 'Mayur', 'Devghare', 'mayur.devghare@gmail.com'),
  (4, 'Suchita', 'Vinchurkar', 'suchita.vinchurkar@gmail.com');

DROP TABLE IF EXISTS test.product;
CREATE TABLE test.product (
  id INT NOT NULL,
  description VARCHAR(500) NULL,
  price INT NULL,
  qty_available INT NULL,
  PRIMARY KEY (id)
) DEFAULT CHARSET = utf8mb4;

INSERT INTO test.product (id, description, price, qty_available) VALUES
  (1, 'IPad', 300, 10),
  (2, 'IPhone', 650, 50),
  (3, 'Sony TV', 320, 100);
